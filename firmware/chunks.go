package firmware

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"
)

// Topic names (docs/FIRMWARE.md §3).

// JobTopic is where the signed job for one device is retained.
func JobTopic(deviceID string) string { return "devices/" + deviceID + "/firmware" }

// GroupJobTopic is where the signed job for a group of devices is retained.
func GroupJobTopic(group string) string { return "groups/" + group + "/firmware" }

// StatusTopic is where a device publishes its firmware status.
func StatusTopic(deviceID string) string { return "devices/" + deviceID + "/firmware/status" }

// ChunkRequestTopic is where devices ask for chunks of a release.
func ChunkRequestTopic(name, version string) string {
	return "firmware/" + name + "/" + version + "/chunks/request"
}

// ChunkResponseTopic is where the publisher answers one device's chunk requests.
func ChunkResponseTopic(name, version, deviceID string) string {
	return "firmware/" + name + "/" + version + "/chunks/response/" + deviceID
}

// ChunkTransport requests one chunk of the image: exactly the bytes [offset, offset+length).
// MQTTChunkClient implements it over a broker; tests implement it in memory.
type ChunkTransport interface {
	RequestChunk(ctx context.Context, offset int64, length int) ([]byte, error)
}

// ChunkSource is a Source that reads the image chunk by chunk through a ChunkTransport, with up
// to Window requests in flight.
type ChunkSource struct {
	Transport ChunkTransport
	ChunkSize int // the manifest's chunk_size
	Window    int // requests in flight; 0 means 4
	Name      string
}

// String returns the source's name ("mqtt" by default).
func (s *ChunkSource) String() string {
	if s.Name == "" {
		return SourceMQTT
	}
	return s.Name
}

// Fetch returns a stream that requests chunks in order. Requests are aligned to ChunkSize
// counted from offset.
func (s *ChunkSource) Fetch(ctx context.Context, offset, length int64) (io.ReadCloser, error) {
	if s.ChunkSize <= 0 {
		return nil, fmt.Errorf("firmware: chunk source: chunk size %d", s.ChunkSize)
	}
	w := s.Window
	if w <= 0 {
		w = 4
	}
	ctx, cancel := context.WithCancel(ctx)
	return &chunkReader{ctx: ctx, cancel: cancel, src: s, window: w, next: offset, end: offset + length}, nil
}

type chunkResult struct {
	data []byte
	err  error
}

type chunkReader struct {
	ctx     context.Context
	cancel  context.CancelFunc
	src     *ChunkSource
	window  int
	next    int64
	end     int64
	pending []chan chunkResult
	buf     []byte
	err     error
}

func (r *chunkReader) launch() {
	off := r.next
	n := int(min(int64(r.src.ChunkSize), r.end-off))
	r.next += int64(n)
	ch := make(chan chunkResult, 1)
	r.pending = append(r.pending, ch)
	go func() {
		data, err := r.src.Transport.RequestChunk(r.ctx, off, n)
		if err == nil && len(data) != n {
			err = fmt.Errorf("firmware: chunk at offset %d: asked for %d bytes, got %d", off, n, len(data))
		}
		if err != nil {
			err = fmt.Errorf("firmware: %s chunk at offset %d: %w", r.src.String(), off, err)
		}
		ch <- chunkResult{data, err}
	}()
}

func (r *chunkReader) Read(p []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	for len(r.buf) == 0 {
		for len(r.pending) < r.window && r.next < r.end {
			r.launch()
		}
		if len(r.pending) == 0 {
			r.err = io.EOF
			return 0, io.EOF
		}
		var res chunkResult
		select {
		case res = <-r.pending[0]:
		case <-r.ctx.Done():
			r.err = r.ctx.Err()
			return 0, r.err
		}
		r.pending = r.pending[1:]
		if res.err != nil {
			r.err = res.err
			return 0, r.err
		}
		r.buf = res.data
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}

func (r *chunkReader) Close() error {
	r.cancel()
	return nil
}

// ChunkRequest is the JSON body of a chunk request.
type ChunkRequest struct {
	Device string `json:"device"`
	Offset int64  `json:"offset"`
	Length int    `json:"length"`
}

// Chunk response framing: "FWCK" | version 1 | status | offset (uint64 BE) | body.
const (
	chunkMagic     = "FWCK"
	chunkVersion   = 1
	chunkStatusOK  = 0
	chunkStatusErr = 1
	chunkHeaderLen = 4 + 1 + 1 + 8
)

// EncodeChunkResponse frames image bytes starting at offset.
func EncodeChunkResponse(offset int64, data []byte) []byte {
	return encodeChunk(chunkStatusOK, offset, data)
}

// EncodeChunkError frames an error answer to the request at offset.
func EncodeChunkError(offset int64, msg string) []byte {
	return encodeChunk(chunkStatusErr, offset, []byte(msg))
}

func encodeChunk(status byte, offset int64, body []byte) []byte {
	b := make([]byte, chunkHeaderLen, chunkHeaderLen+len(body))
	copy(b, chunkMagic)
	b[4] = chunkVersion
	b[5] = status
	binary.BigEndian.PutUint64(b[6:], uint64(offset))
	return append(b, body...)
}

// ChunkResponse is a decoded chunk response. Err is the publisher's error message, if any.
type ChunkResponse struct {
	Offset int64
	Data   []byte
	Err    string
}

// DecodeChunkResponse parses a chunk response frame. Data aliases payload.
func DecodeChunkResponse(payload []byte) (ChunkResponse, error) {
	if len(payload) < chunkHeaderLen || string(payload[:4]) != chunkMagic {
		return ChunkResponse{}, errors.New("firmware: chunk response: not a FWCK frame")
	}
	if payload[4] != chunkVersion {
		return ChunkResponse{}, fmt.Errorf("firmware: chunk response: version %d, want %d", payload[4], chunkVersion)
	}
	off := binary.BigEndian.Uint64(payload[6:14])
	if off > MaxImageSize {
		return ChunkResponse{}, fmt.Errorf("firmware: chunk response: offset %d out of range", off)
	}
	r := ChunkResponse{Offset: int64(off)}
	switch payload[5] {
	case chunkStatusOK:
		r.Data = payload[chunkHeaderLen:]
	case chunkStatusErr:
		r.Err = string(payload[chunkHeaderLen:])
		if r.Err == "" {
			r.Err = "unspecified error"
		}
	default:
		return ChunkResponse{}, fmt.Errorf("firmware: chunk response: status %d", payload[5])
	}
	return r, nil
}

// DecodeChunkRequest parses and checks a chunk request.
func DecodeChunkRequest(payload []byte) (ChunkRequest, error) {
	var req ChunkRequest
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return ChunkRequest{}, fmt.Errorf("firmware: chunk request: %w", err)
	}
	if !identOK(req.Device, 128) {
		return ChunkRequest{}, fmt.Errorf("firmware: chunk request: device id %q must be 1-128 characters of [A-Za-z0-9._-]", req.Device)
	}
	if req.Offset < 0 || req.Length <= 0 || req.Length > MaxChunkSize {
		return ChunkRequest{}, fmt.Errorf("firmware: chunk request from %s: offset %d length %d out of range", req.Device, req.Offset, req.Length)
	}
	return req, nil
}

// ChunkServer answers chunk requests from an image (the publisher side of `firmware publish`).
type ChunkServer struct {
	Image     io.ReaderAt
	Size      int64
	ChunkSize int // the manifest's chunk_size: longer requests are refused
}

// Handle answers one request payload. It returns the requesting device id (publish the answer
// on ChunkResponseTopic(name, version, device)) and the response frame. err is set only when the
// request cannot be parsed: then there is nobody to answer.
func (s *ChunkServer) Handle(payload []byte) (device string, resp []byte, err error) {
	req, err := DecodeChunkRequest(payload)
	if err != nil {
		return "", nil, err
	}
	if req.Length > s.ChunkSize {
		return req.Device, EncodeChunkError(req.Offset, fmt.Sprintf("length %d exceeds chunk_size %d", req.Length, s.ChunkSize)), nil
	}
	if req.Offset > s.Size || int64(req.Length) > s.Size-req.Offset {
		return req.Device, EncodeChunkError(req.Offset, fmt.Sprintf("range %d+%d beyond image size %d", req.Offset, req.Length, s.Size)), nil
	}
	buf := make([]byte, chunkHeaderLen+req.Length)
	if _, err := s.Image.ReadAt(buf[chunkHeaderLen:], req.Offset); err != nil {
		return req.Device, EncodeChunkError(req.Offset, "read image: "+err.Error()), nil
	}
	copy(buf, chunkMagic)
	buf[4] = chunkVersion
	buf[5] = chunkStatusOK
	binary.BigEndian.PutUint64(buf[6:], uint64(req.Offset))
	return req.Device, buf, nil
}

// MQTTChunkClient is a ChunkTransport over any publish/subscribe client: Publish sends a request
// on RequestTopic, and the caller's subscription to ChunkResponseTopic hands every message to
// Deliver. It retries a request that got no answer within Timeout, up to Attempts times.
type MQTTChunkClient struct {
	Publish      func(ctx context.Context, topic string, payload []byte) error
	RequestTopic string
	DeviceID     string
	Timeout      time.Duration // per attempt; 0 means 10s
	Attempts     int           // 0 means 5

	mu      sync.Mutex
	waiters map[int64]chan ChunkResponse
}

// Deliver hands a response message to the waiting request. It never blocks, so it is safe in a
// paho message handler. Unexpected or malformed messages are dropped.
func (c *MQTTChunkClient) Deliver(payload []byte) {
	r, err := DecodeChunkResponse(payload)
	if err != nil {
		return
	}
	r.Data = bytes.Clone(r.Data)
	c.mu.Lock()
	ch := c.waiters[r.Offset]
	c.mu.Unlock()
	if ch != nil {
		select {
		case ch <- r:
		default:
		}
	}
}

// RequestChunk publishes a request and waits for the answer with the same offset.
func (c *MQTTChunkClient) RequestChunk(ctx context.Context, offset int64, length int) ([]byte, error) {
	ch := make(chan ChunkResponse, 1)
	c.mu.Lock()
	if c.waiters == nil {
		c.waiters = make(map[int64]chan ChunkResponse)
	}
	c.waiters[offset] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.waiters, offset)
		c.mu.Unlock()
	}()
	req, _ := json.Marshal(ChunkRequest{Device: c.DeviceID, Offset: offset, Length: length})
	timeout, attempts := c.Timeout, c.Attempts
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	if attempts <= 0 {
		attempts = 5
	}
	for try := 1; ; try++ {
		if err := c.Publish(ctx, c.RequestTopic, req); err != nil {
			return nil, fmt.Errorf("publish chunk request on %s: %w", c.RequestTopic, err)
		}
		t := time.NewTimer(timeout)
		select {
		case r := <-ch:
			t.Stop()
			if r.Err != "" {
				return nil, fmt.Errorf("publisher refused chunk: %s", r.Err)
			}
			if len(r.Data) != length {
				return nil, fmt.Errorf("asked for %d bytes, got %d", length, len(r.Data))
			}
			return r.Data, nil
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
			if try >= attempts {
				return nil, fmt.Errorf("no answer on the chunk response topic after %d attempts of %s: is `firmware publish` running?", attempts, timeout)
			}
		}
	}
}
