package firmware

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Source delivers image bytes. Fetch returns a stream of the bytes [offset, offset+length); the
// stream may end early (io.EOF or an error) and the downloader then asks again from where it
// stopped, so a Source need not retry by itself. Implementations: HTTPSource, ChunkSource.
type Source interface {
	Fetch(ctx context.Context, offset, length int64) (io.ReadCloser, error)
	// String names the source in logs and status messages.
	String() string
}

// HTTPSource fetches an image over HTTPS with Range requests.
type HTTPSource struct {
	URL    string
	Client *http.Client
}

// NewHTTPSource returns an HTTPS source for url whose connections use tlsConfig, so the device's
// TPM-backed mTLS identity (and its session cache) is reused. tlsConfig may be nil in tests only.
func NewHTTPSource(url string, tlsConfig *tls.Config) *HTTPSource {
	tr := &http.Transport{
		TLSClientConfig:       tlsConfig,
		TLSHandshakeTimeout:   30 * time.Second,
		ResponseHeaderTimeout: 60 * time.Second,
		IdleConnTimeout:       90 * time.Second,
		ForceAttemptHTTP2:     true,
		Proxy:                 http.ProxyFromEnvironment,
	}
	return &HTTPSource{URL: url, Client: &http.Client{Transport: tr}}
}

// String returns the URL.
func (s *HTTPSource) String() string { return s.URL }

// Fetch sends GET with "Range: bytes=offset-(offset+length-1)". It accepts 206 with a matching
// Content-Range (a shorter range is fine: the stream just ends early), or 200 for offset 0.
func (s *HTTPSource) Fetch(ctx context.Context, offset, length int64) (io.ReadCloser, error) {
	if length <= 0 {
		return nil, fmt.Errorf("firmware: fetch %s: length %d", s.URL, length)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.URL, nil)
	if err != nil {
		return nil, fmt.Errorf("firmware: fetch %s: %w", s.URL, err)
	}
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", offset, offset+length-1))
	// A transparent gzip would change the bytes the Range refers to.
	req.Header.Set("Accept-Encoding", "identity")
	client := s.Client
	if client == nil {
		client = http.DefaultClient
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("firmware: fetch %s: %w", s.URL, err)
	}
	switch resp.StatusCode {
	case http.StatusPartialContent:
		start, end, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil || start != offset || end < start || end > offset+length-1 {
			resp.Body.Close()
			return nil, fmt.Errorf("firmware: fetch %s: asked for bytes %d-%d, server sent Content-Range %q",
				s.URL, offset, offset+length-1, resp.Header.Get("Content-Range"))
		}
		return limitedBody{Reader: io.LimitReader(resp.Body, end-start+1), c: resp.Body}, nil
	case http.StatusOK:
		if offset != 0 {
			resp.Body.Close()
			return nil, fmt.Errorf("firmware: fetch %s: server ignored the Range request (200 for offset %d): it must support Range to resume", s.URL, offset)
		}
		return limitedBody{Reader: io.LimitReader(resp.Body, length), c: resp.Body}, nil
	default:
		resp.Body.Close()
		return nil, fmt.Errorf("firmware: fetch %s bytes %d-%d: HTTP %s", s.URL, offset, offset+length-1, resp.Status)
	}
}

type limitedBody struct {
	io.Reader
	c io.Closer
}

func (b limitedBody) Close() error { return b.c.Close() }

// parseContentRange parses "bytes START-END/TOTAL" (TOTAL may be "*").
func parseContentRange(v string) (start, end int64, err error) {
	rest, ok := strings.CutPrefix(v, "bytes ")
	if !ok {
		return 0, 0, fmt.Errorf("not a byte range")
	}
	rng, _, ok := strings.Cut(rest, "/")
	if !ok {
		return 0, 0, fmt.Errorf("no total")
	}
	a, b, ok := strings.Cut(rng, "-")
	if !ok {
		return 0, 0, fmt.Errorf("no range")
	}
	if start, err = strconv.ParseInt(a, 10, 64); err != nil {
		return 0, 0, err
	}
	if end, err = strconv.ParseInt(b, 10, 64); err != nil {
		return 0, 0, err
	}
	return start, end, nil
}
