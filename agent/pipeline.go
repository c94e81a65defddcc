package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tpmagent/tpmagent/agent/batch"
	"github.com/tpmagent/tpmagent/agent/reading"
	"github.com/tpmagent/tpmagent/agent/source"
	"github.com/tpmagent/tpmagent/agent/spool"
	"github.com/tpmagent/tpmagent/agent/status"
	"github.com/tpmagent/tpmagent/transport"
)

// ErrStopped is returned by Submit once the pipeline has begun draining.
var ErrStopped = errors.New("agent: pipeline stopped: the agent is shutting down")

// SealedSuffix is appended to the telemetry topic for sealed frames.
const SealedSuffix = "/sealed"

// Options configure a Pipeline. Queue and Publisher are required.
type Options struct {
	// Topic is the telemetry topic (telemetry.topic with {device_id}
	// replaced), e.g. devices/dev-0001/telemetry. The encoder's or the
	// sealer's suffix is appended (docs/TELEMETRY.md).
	Topic string
	// QoS is 0 or 1 (telemetry.qos).
	QoS byte
	// Batch bounds batches (telemetry.batch_max, batch_bytes, linger).
	Batch batch.Options
	// Encoder encodes batches; nil means JSON.
	Encoder batch.Encoder
	// Sealer, when not nil, seals every encoded batch before it is spooled.
	Sealer Sealer
	// Queue is the durable spool. Run closes it when it returns.
	Queue Queue
	// Publisher is the broker connection.
	Publisher transport.Publisher
	// Counters receive the pipeline's counts; nil keeps private ones.
	Counters *status.Counters
	// Logger; nil discards.
	Logger *slog.Logger
	// IngestQueue is the number of readings that may wait for the batcher
	// (default 8192).
	IngestQueue int
	// ReadMax is the most records taken from the spool per Next (default 512).
	ReadMax int
	// DrainTimeout bounds the graceful drain after the context ends: flush
	// the batcher, spool the last batches, wait for outstanding acks
	// (default 10 s). What is not acknowledged by then stays in the spool.
	DrainTimeout time.Duration
	// StopWhenSourcesDone starts the drain as soon as every source has
	// returned (bench), rather than only when the context ends.
	StopWhenSourcesDone bool
}

// Pipeline moves readings from sources to the broker through the spool.
type Pipeline struct {
	opts    Options
	log     *slog.Logger
	c       *status.Counters
	enc     batch.Encoder
	topic   string // where encoded (or sealed) batches go
	header  []byte // spool message header for topic, unsealed
	q       Queue
	pub     transport.Publisher
	in      chan batch.Item
	appendQ chan appendJob

	mu     sync.RWMutex // guards closed against Submit
	closed bool

	inflight   atomic.Int64
	gen        atomic.Uint64 // rewinds so far
	failedGen  atomic.Int64  // generation with an unacknowledged failure, -1 none
	rewind     atomic.Bool
	inNext     atomic.Bool
	reads      atomic.Uint64 // Next calls that returned records
	nextMu     sync.Mutex
	nextCancel context.CancelFunc

	ackMu   sync.Mutex
	acks    []uint64
	ackWake chan struct{}

	started atomic.Bool
}

type appendJob struct {
	msgs  [][]byte
	items []batch.Item
}

// New checks opts and returns a Pipeline ready to Run.
func New(opts Options) (*Pipeline, error) {
	if opts.Queue == nil || opts.Publisher == nil {
		return nil, fmt.Errorf("agent: pipeline needs a spool and a publisher")
	}
	if opts.Topic == "" {
		return nil, fmt.Errorf("agent: telemetry.topic is empty: set it, e.g. devices/{device_id}/telemetry")
	}
	if opts.QoS > 1 {
		return nil, fmt.Errorf("agent: telemetry.qos %d: use 0 or 1", opts.QoS)
	}
	if opts.Encoder == nil {
		opts.Encoder = batch.JSON{}
	}
	if opts.Counters == nil {
		opts.Counters = new(status.Counters)
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.IngestQueue <= 0 {
		opts.IngestQueue = 8192
	}
	if opts.ReadMax <= 0 {
		opts.ReadMax = 512
	}
	if opts.DrainTimeout <= 0 {
		opts.DrainTimeout = 10 * time.Second
	}
	p := &Pipeline{
		opts:    opts,
		log:     opts.Logger,
		c:       opts.Counters,
		enc:     opts.Encoder,
		q:       opts.Queue,
		pub:     opts.Publisher,
		in:      make(chan batch.Item, opts.IngestQueue),
		appendQ: make(chan appendJob, appendQueueDepth(opts.IngestQueue, opts.Batch.Max)),
		ackWake: make(chan struct{}, 1),
	}
	p.failedGen.Store(-1)
	p.topic = opts.Topic + opts.Encoder.TopicSuffix()
	if opts.Sealer != nil {
		p.topic = opts.Topic + SealedSuffix
	}
	p.header = encodeMessage(Message{Topic: p.topic})
	return p, nil
}

// Topic returns the topic batches are published on.
func (p *Pipeline) Topic() string { return p.topic }

// Counters returns the pipeline's counters.
func (p *Pipeline) Counters() *status.Counters { return p.c }

// Submit implements source.Sink.
func (p *Pipeline) Submit(ctx context.Context, r reading.Reading, done func(error)) error {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.closed {
		return ErrStopped
	}
	select {
	case p.in <- batch.Item{Reading: r, Done: done}:
		p.c.ReadingsIn.Add(1)
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Reject implements source.Sink.
func (p *Pipeline) Reject(err error) {
	p.c.ReadingsRejected.Add(1)
	p.log.Debug("telemetry line rejected", "err", err)
}

// Run runs the pipeline and the sources until ctx ends (or a source fails),
// then drains: it stops the sources, flushes the batcher, spools the last
// batches, waits up to DrainTimeout for the broker to acknowledge what was
// published, and closes the spool. It returns the first source error.
func (p *Pipeline) Run(ctx context.Context, sources ...source.Source) error {
	if p.started.Swap(true) {
		return fmt.Errorf("agent: pipeline already ran: make a new one")
	}
	// work runs the stages; it outlives ctx by the drain.
	work, cancelWork := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelWork()

	var stages sync.WaitGroup
	batcherDone := make(chan struct{})
	appenderDone := make(chan struct{})
	go func() {
		defer close(batcherDone)
		defer close(p.appendQ)
		batch.New(p.opts.Batch).Run(p.in, func(items []batch.Item) { p.emit(work, items) })
	}()
	go func() {
		defer close(appenderDone)
		p.appendLoop(work)
	}()
	ackerDone := make(chan struct{})
	go func() {
		defer close(ackerDone)
		p.ackLoop(work)
	}()
	stages.Add(2)
	go func() { defer stages.Done(); p.watchConnections(work) }()
	go func() { defer stages.Done(); p.publishLoop(work) }()

	// Sources.
	srcCtx, stopSources := context.WithCancel(ctx)
	defer stopSources()
	errs := make(chan error, len(sources))
	var srcWG sync.WaitGroup
	for _, s := range sources {
		srcWG.Add(1)
		go func() {
			defer srcWG.Done()
			if err := s.Run(srcCtx, p); err != nil && srcCtx.Err() == nil {
				errs <- fmt.Errorf("agent: source %s: %w", s.Name(), err)
				stopSources()
			}
		}()
	}
	allDone := make(chan struct{})
	go func() { srcWG.Wait(); close(allDone) }()
	var until <-chan struct{}
	if p.opts.StopWhenSourcesDone {
		until = allDone
	}
	select {
	case <-srcCtx.Done():
	case <-until:
	}
	stopSources()
	p.log.Info("telemetry pipeline draining", "timeout", p.opts.DrainTimeout)
	deadline := time.AfterFunc(p.opts.DrainTimeout, cancelWork)
	defer deadline.Stop()
	srcWG.Wait()

	// No more readings: flush the batcher and the appender.
	p.mu.Lock()
	p.closed = true
	close(p.in)
	p.mu.Unlock()
	<-batcherDone
	<-appenderDone

	// Wait for the broker to acknowledge what is spooled.
	p.waitDrained(work)
	drained := work.Err() == nil
	cancelWork()
	stages.Wait()
	<-ackerDone
	if err := p.q.Close(); err != nil {
		p.c.SetError(err)
		p.log.Error("close spool", "err", err)
	}
	if !drained {
		p.log.Warn("telemetry drain timed out: unacknowledged messages stay in the spool and are sent after the next start", "in_flight", p.inflight.Load())
	} else {
		p.log.Info("telemetry pipeline drained")
	}
	select {
	case err := <-errs:
		return err
	default:
		return nil
	}
}

// emit encodes (and seals) one batch and queues it for the spool. It runs on
// the batcher goroutine.
func (p *Pipeline) emit(ctx context.Context, items []batch.Item) {
	rs := batch.Readings(items)
	var msgs [][]byte
	var err error
	if p.opts.Sealer == nil {
		buf := make([]byte, len(p.header), len(p.header)+estimate(rs))
		copy(buf, p.header)
		buf, err = p.enc.AppendBatch(buf, rs)
		msgs = [][]byte{buf}
	} else {
		var payload, frame []byte
		var before []Message
		payload, err = p.enc.AppendBatch(nil, rs)
		if err == nil {
			frame, before, err = p.opts.Sealer.Seal(p.topic, payload)
		}
		if err == nil {
			for _, m := range before {
				msgs = append(msgs, encodeMessage(m))
			}
			msgs = append(msgs, encodeMessage(Message{Topic: p.topic, Payload: frame}))
		}
	}
	if err != nil {
		err = fmt.Errorf("agent: encode batch of %d readings: %w", len(items), err)
		p.c.SetError(err)
		p.log.Error("telemetry batch dropped", "err", err)
		finish(items, err)
		return
	}
	select {
	case p.appendQ <- appendJob{msgs: msgs, items: items}:
	case <-ctx.Done():
		finish(items, fmt.Errorf("agent: spool: %w", ErrStopped))
	}
}

// appendQueueDepth is how many encoded batches may wait for the spool:
// about as many readings as the ingest queue holds (at least 16 batches,
// at most 1024), so that memory does not grow with the batch size (1024
// batches of 64 readings held ≈ 10 MB) while small batches still form
// large write groups for one fsync.
func appendQueueDepth(ingest, batchMax int) int {
	if batchMax <= 0 {
		batchMax = batch.DefaultMax
	}
	return min(max(ingest/batchMax, 16), 1024)
}

func estimate(rs []reading.Reading) int {
	n := 2
	for i := range rs {
		n += rs[i].EstimatedSize()
	}
	return n
}

func finish(items []batch.Item, err error) {
	for _, it := range items {
		if it.Done != nil {
			it.Done(err)
		}
	}
}

// asyncAppender is implemented by agent/spool: the records get their seqs
// at once and become durable later, so the next group can be written while
// the previous one is being fsynced.
type asyncAppender interface {
	AppendAsync(ctx context.Context, data ...[]byte) (spool.Pending, error)
}

type appended struct {
	pending spool.Pending
	err     error
	jobs    []appendJob
	records int
}

// appendLoop writes queued batches to the spool, many per call (group
// commit), and hands them to waitLoop, which answers their readings once
// they are durable.
func (p *Pipeline) appendLoop(ctx context.Context) {
	// A group is bounded in records and bytes: a group larger than the
	// spool's free space would never fit, and groups queued behind the
	// committer are merged into one write and fsync anyway.
	const maxGroup, maxGroupBytes = 1024, 64 << 10
	// At most two groups await durability: enough to overlap writing one
	// with preparing the next, and little enough that the spool always has
	// durable segments to drop under on_full=drop_oldest.
	waits := make(chan appended)
	waitDone := make(chan struct{})
	go func() {
		defer close(waitDone)
		p.waitLoop(ctx, waits)
	}()
	async, _ := p.q.(asyncAppender)
	var data [][]byte
	size := func(j appendJob) int {
		n := 0
		for _, m := range j.msgs {
			n += len(m)
		}
		return n
	}
	var carry *appendJob
	for {
		var jobs []appendJob
		if carry != nil {
			jobs = append(jobs, *carry)
			carry = nil
		} else {
			job, ok := <-p.appendQ
			if !ok {
				break
			}
			jobs = append(jobs, job)
		}
		bytes := size(jobs[0])
	more:
		for len(jobs) < maxGroup && bytes < maxGroupBytes {
			select {
			case j, ok := <-p.appendQ:
				if !ok {
					break more
				}
				if bytes+size(j) > maxGroupBytes {
					carry = &j
					break more
				}
				jobs = append(jobs, j)
				bytes += size(j)
			default:
				break more
			}
		}
		data = data[:0]
		for _, j := range jobs {
			data = append(data, j.msgs...)
		}
		a := appended{jobs: jobs, records: len(data)}
		if async != nil {
			a.pending, a.err = async.AppendAsync(ctx, data...)
		} else {
			_, a.err = p.q.Append(ctx, data...)
		}
		clear(data)
		waits <- a
	}
	close(waits)
	<-waitDone
}

func (p *Pipeline) waitLoop(ctx context.Context, waits <-chan appended) {
	for a := range waits {
		err := a.err
		if err == nil {
			err = a.pending.Wait(ctx)
		}
		if err != nil {
			err = fmt.Errorf("agent: spool append: %w", err)
			p.c.SetError(err)
			p.log.Error("telemetry not spooled", "records", a.records, "err", err)
		} else {
			p.c.Batches.Add(uint64(len(a.jobs)))
		}
		for _, j := range a.jobs {
			finish(j.items, err)
		}
	}
}

// watchConnections asks the publish loop to rewind after every connection.
func (p *Pipeline) watchConnections(ctx context.Context) {
	first := true
	conns := p.pub.Connections()
	for {
		select {
		case <-ctx.Done():
			return
		case <-conns:
		}
		if first {
			first = false
			// Nothing was published before the first connection (Publish
			// blocks until one is up) and the spool starts at its oldest
			// unacknowledged record: rewind only if something failed.
			if p.failedGen.Load() < 0 {
				continue
			}
		} else {
			p.c.Reconnects.Add(1)
		}
		p.rewind.Store(true)
		p.nextMu.Lock()
		if p.nextCancel != nil {
			p.nextCancel()
		}
		p.nextMu.Unlock()
	}
}

// publishLoop reads the spool in order and publishes every record.
func (p *Pipeline) publishLoop(ctx context.Context) {
	qos := p.opts.QoS
	for ctx.Err() == nil {
		if p.rewind.Swap(false) {
			p.doRewind(ctx)
		}
		nctx, cancel := context.WithCancel(ctx)
		p.nextMu.Lock()
		p.nextCancel = cancel
		p.nextMu.Unlock()
		if p.rewind.Load() { // a connection arrived before nextCancel was set
			cancel()
		}
		p.inNext.Store(true)
		recs, err := p.q.Next(nctx, p.opts.ReadMax)
		p.inNext.Store(false)
		p.nextMu.Lock()
		p.nextCancel = nil
		p.nextMu.Unlock()
		cancel()
		if err != nil {
			if ctx.Err() != nil || nctx.Err() != nil {
				continue
			}
			err = fmt.Errorf("agent: spool read: %w", err)
			p.c.SetError(err)
			p.log.Error("telemetry spool read failed", "err", err)
			sleep(ctx, 100*time.Millisecond)
			continue
		}
		if len(recs) > 0 {
			p.reads.Add(1)
		}
		for _, rec := range recs {
			if p.rewind.Load() {
				break // the rewind re-reads the rest
			}
			m, err := decodeMessage(rec.Data)
			if err != nil {
				p.c.SetError(err)
				p.log.Error("telemetry spool record skipped", "seq", rec.Seq, "err", err)
				p.q.Ack(rec.Seq)
				continue
			}
			seq, gen, n := rec.Seq, p.gen.Load(), len(m.Payload)
			p.inflight.Add(1)
			err = p.pub.Publish(ctx, m.Topic, qos, m.Retained, m.Payload, func(err error) { p.done(seq, gen, n, err) })
			if err != nil {
				p.inflight.Add(-1)
				if ctx.Err() != nil {
					return
				}
				p.c.SetError(err)
				p.log.Warn("telemetry publish refused; rewinding", "seq", seq, "err", err)
				p.rewind.Store(true)
				sleep(ctx, 50*time.Millisecond)
				break
			}
			p.c.MessagesPublished.Add(1)
		}
	}
}

func (p *Pipeline) doRewind(ctx context.Context) {
	if ra, ok := p.opts.Sealer.(Reannouncer); ok {
		for _, m := range ra.Reannounce() {
			if err := p.pub.Publish(ctx, m.Topic, 1, m.Retained, m.Payload, func(error) {}); err != nil {
				p.log.Warn("session announcement not republished", "topic", m.Topic, "err", err)
			}
		}
	}
	p.gen.Add(1)
	p.failedGen.Store(-1)
	p.q.Rewind()
}

// done is the publish callback.
func (p *Pipeline) done(seq, gen uint64, n int, err error) {
	if err != nil {
		p.c.MessagesFailed.Add(1)
		if gen == p.gen.Load() {
			p.failedGen.Store(int64(gen))
		}
		if !errors.Is(err, transport.ErrClosed) {
			p.c.SetError(fmt.Errorf("agent: publish seq %d: %w", seq, err))
		}
	} else {
		p.c.MessagesAcked.Add(1)
		p.c.Bytes.Add(uint64(n))
		p.ackMu.Lock()
		p.acks = append(p.acks, seq)
		p.ackMu.Unlock()
		select {
		case p.ackWake <- struct{}{}:
		default:
		}
	}
	p.inflight.Add(-1)
}

// ackLoop hands acknowledged seqs to the spool in groups.
func (p *Pipeline) ackLoop(ctx context.Context) {
	var seqs []uint64
	flush := func() {
		p.ackMu.Lock()
		seqs, p.acks = p.acks, seqs[:0]
		p.ackMu.Unlock()
		if len(seqs) > 0 {
			p.q.Ack(seqs...)
		}
	}
	for {
		select {
		case <-p.ackWake:
			flush()
		case <-ctx.Done():
			flush()
			return
		}
	}
}

// waitDrained returns when everything spooled was published and
// acknowledged, or when ctx ends.
func (p *Pipeline) waitDrained(ctx context.Context) {
	t := time.NewTicker(time.Millisecond)
	defer t.Stop()
	idle, reads := 0, p.reads.Load()
	for {
		r := p.reads.Load()
		quiet := p.inflight.Load() == 0 && !p.rewind.Load() && p.failedGen.Load() < 0
		if quiet && p.pub.Connected() && p.spoolEmpty() {
			// Every spooled record is acknowledged (the appender is done,
			// so nothing new comes): drained, no need to watch longer.
			return
		}
		if quiet && p.inNext.Load() && r == reads && p.spoolSettled() {
			idle++
			if idle >= 15 { // 15 ms without any movement
				return
			}
		} else {
			idle, reads = 0, r
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// spoolRecords is the spool's count of unacknowledged records; ok is false
// for a queue without Stats (test fakes).
func (p *Pipeline) spoolRecords() (n int64, ok bool) {
	st, ok := p.q.(interface{ Stats() spool.Stats })
	if !ok {
		return 0, false
	}
	return st.Stats().Records, true
}

// spoolEmpty reports whether every record in the spool is acknowledged.
func (p *Pipeline) spoolEmpty() bool {
	n, ok := p.spoolRecords()
	return ok && n == 0
}

// spoolSettled reports whether the drain has nothing left to wait for in
// the spool: every record is acknowledged, or no broker is connected (what
// is left is sent after the next start). Without this check a group commit
// still waiting for its fsync looked like an empty spool and the drain ended
// with records unpublished.
func (p *Pipeline) spoolSettled() bool {
	n, ok := p.spoolRecords()
	return !ok || n == 0 || !p.pub.Connected()
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
