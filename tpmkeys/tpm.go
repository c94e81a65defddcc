package tpmkeys

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// Default handles and indices. They match the `tpm:` section of the agent configuration.
const (
	// DefaultSRKHandle is the persistent handle of the storage root key (TCG provisioning
	// guidance's recommended SRK handle).
	DefaultSRKHandle uint32 = 0x81000002
	// DefaultKeyHandle is the persistent handle of the device key.
	DefaultKeyHandle uint32 = 0x81000100
	// DefaultCounterIndex is the NV index of the firmware anti-rollback counter. It lies in
	// the range the TCG handle registry assigns to the platform manufacturer
	// (0x01400000–0x017FFFFF); the TPM does not enforce the ranges and the index is defined
	// with owner authorization.
	DefaultCounterIndex uint32 = 0x01500100
)

// TPM is an open connection to a TPM 2.0. All its methods and those of the Keys and Counters
// obtained from it are safe for concurrent use: every TPM command (or sequence of commands
// that belongs together) runs under the TPM's own lock. Close it when done.
type TPM struct {
	device string
	// lock is a one-slot semaphore so that waiting for the TPM honours ctx.
	lock chan struct{}
	rt   *retryTransport

	mu     sync.Mutex // guards keys and closed
	keys   map[*Key]struct{}
	closed bool

	// staleFlushed counts handles of dead earlier clients flushed by Open.
	staleFlushed int
}

// Open opens the TPM named by device:
//
//	/dev/tpmrm0, /dev/tpm0, /dev/tpmrmN, /dev/tpmN  a Linux TPM character device
//	swtpm://HOST:PORT[?platform=PPORT]              swtpm/MS simulator TCP protocol; the
//	                                                platform (control) port defaults to PORT+1
//
// "simulator" is accepted by ParseDevice but can only be opened from tests, through
// OpenTransport (the simulator needs cgo and stays out of release builds).
// Open checks that the TPM answers before it returns.
func Open(ctx context.Context, device string) (*TPM, error) {
	d, err := ParseDevice(device)
	if err != nil {
		return nil, err
	}
	var base transport.TPM
	var swtpm *swtpmTransport
	switch d.Kind {
	case DeviceSimulator:
		return nil, fmt.Errorf("tpmkeys: open %q: the in-process simulator exists only in test builds; "+
			"tests open it with tpmkeys.OpenTransport(simulator.OpenSimulator()), the agent needs "+
			"/dev/tpmrm0 or swtpm://HOST:PORT", device)
	case DeviceLinux:
		ld, err := openLinux(d.Path)
		if err != nil {
			return nil, err
		}
		base = ld
	case DeviceSwtpm:
		st := &swtpmTransport{cmdAddr: d.CommandAddr, platAddr: d.PlatformAddr}
		if err := st.connect(); err != nil {
			return nil, fmt.Errorf("tpmkeys: open %s: cannot reach swtpm at %s (platform port %s): %w; "+
				"start it, e.g. `swtpm socket --tpm2 --server type=tcp,port=%s --ctrl type=tcp,port=%s "+
				"--tpmstate dir=/var/lib/swtpm --flags not-need-init,startup-clear`",
				device, d.CommandAddr, d.PlatformAddr, err, portOf(d.CommandAddr), portOf(d.PlatformAddr))
		}
		base, swtpm = st, st
	}
	t := newTPM(device, base)
	if swtpm == nil {
		if err := t.ping(ctx); err != nil {
			t.Close()
			return nil, fmt.Errorf("tpmkeys: open %s: the TPM does not answer: %w", device, err)
		}
		return t.cleanStale(ctx, d)
	}
	// swtpm serves one connection at a time: while another client holds it, our connection
	// is accepted but no command is answered. Do not wait forever for the first answer.
	conn := swtpm.conn
	done := make(chan error, 1)
	go func() { done <- t.ping(context.Background()) }()
	timer := time.NewTimer(swtpmOpenTimeout)
	defer timer.Stop()
	select {
	case err = <-done:
	case <-timer.C:
		err = fmt.Errorf("no answer within %v", swtpmOpenTimeout)
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err != nil {
		_ = conn.Close() // unblocks a ping stuck in Read
		<-done
		t.Close()
		return nil, fmt.Errorf("tpmkeys: open %s: swtpm at %s accepted the connection but does not answer (%w): "+
			"swtpm serves one client at a time, so stop the other client (a running tpmagent, tpm2-tools)", device, d.CommandAddr, err)
	}
	return t.cleanStale(ctx, d)
}

// cleanStale flushes what dead earlier clients left in a TPM without a
// resource manager (see flushStale).
func (t *TPM) cleanStale(ctx context.Context, d Device) (*TPM, error) {
	if hasResourceManager(d) {
		return t, nil
	}
	n, err := t.flushStale(ctx)
	if err != nil {
		t.Close()
		return nil, err
	}
	t.staleFlushed = n
	return t, nil
}

// swtpmOpenTimeout bounds the wait for swtpm's first answer in Open.
const swtpmOpenTimeout = 10 * time.Second

// OpenTransport wraps an already open go-tpm transport (for tests: go-tpm's
// transport/simulator). The TPM must be started (TPM2_Startup done). If tpm implements
// io.Closer, TPM.Close closes it. name is used in error messages.
func OpenTransport(tpm transport.TPM, name string) *TPM {
	return newTPM(name, tpm)
}

func newTPM(device string, base transport.TPM) *TPM {
	return &TPM{
		device: device,
		lock:   make(chan struct{}, 1),
		rt:     &retryTransport{next: base},
		keys:   make(map[*Key]struct{}),
	}
}

// Device returns the device string the TPM was opened with.
func (t *TPM) Device() string { return t.device }

// Retries returns how many commands were re-sent because the TPM answered TPM_RC_RETRY,
// TPM_RC_YIELDED or TPM_RC_TESTING.
func (t *TPM) Retries() uint64 { return t.rt.retries.Load() }

// ErrClosed is returned by operations on a closed TPM.
var ErrClosed = errors.New("tpmkeys: TPM is closed")

// do runs fn with exclusive access to the TPM. ctx bounds the wait for the lock and the
// backoff between retries (a command already sent to the TPM cannot be interrupted).
func (t *TPM) do(ctx context.Context, fn func(tp transport.TPM) error) error {
	select {
	case t.lock <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("tpmkeys: waiting for TPM %s: %w", t.device, ctx.Err())
	}
	defer func() { <-t.lock }()
	t.mu.Lock()
	closed := t.closed
	t.mu.Unlock()
	if closed {
		return ErrClosed
	}
	t.rt.ctx = ctx
	defer func() { t.rt.ctx = nil }()
	return fn(t.rt)
}

func (t *TPM) ping(ctx context.Context) error {
	return t.do(ctx, func(tp transport.TPM) error {
		_, err := tpm2.GetRandom{BytesRequested: 8}.Execute(tp)
		return err
	})
}

// Close flushes the signing sessions of all keys loaded from this TPM and closes the
// connection. Keys and counters from it stop working. Close is idempotent.
func (t *TPM) Close() error {
	t.lock <- struct{}{}
	defer func() { <-t.lock }()
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	t.closed = true
	keys := t.keys
	t.keys = nil
	t.mu.Unlock()
	t.rt.ctx = context.Background()
	var errs []error
	for k := range keys {
		if err := k.dropSession(t.rt); err != nil {
			errs = append(errs, fmt.Errorf("flush session of key 0x%x: %w", k.handle, err))
		}
	}
	if c, ok := t.rt.next.(io.Closer); ok {
		if err := c.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("tpmkeys: close %s: %w", t.device, err)
	}
	return nil
}

// flush flushes a transient object or session handle, ignoring errors: it is used on cleanup
// paths where the original error matters more.
func flush(tp transport.TPM, h tpm2.TPMHandle) {
	_, _ = tpm2.FlushContext{FlushHandle: h}.Execute(tp)
}

// retryTransport re-sends a command the TPM answered with TPM_RC_RETRY, TPM_RC_YIELDED or
// TPM_RC_TESTING (TPM 2.0 Part 2, 6.6.3: the command was not executed), with exponential
// backoff. It is only used under TPM.lock.
type retryTransport struct {
	next    transport.TPM
	ctx     context.Context // set by TPM.do for the duration of an operation
	retries atomic.Uint64
}

const (
	retryFirstDelay = 2 * time.Millisecond
	retryMaxDelay   = 500 * time.Millisecond
	retryMaxTotal   = 10 * time.Second
)

// Send implements transport.TPM.
func (r *retryTransport) Send(cmd []byte) ([]byte, error) {
	delay := retryFirstDelay
	start := time.Now()
	for {
		rsp, err := r.next.Send(cmd)
		if err != nil {
			return nil, err
		}
		rc := responseCode(rsp)
		if rc != tpm2.TPMRCRetry && rc != tpm2.TPMRCYielded && rc != tpm2.TPMRCTesting {
			return rsp, nil
		}
		if time.Since(start)+delay > retryMaxTotal {
			return rsp, nil // give up: the caller sees the warning as an error
		}
		r.retries.Add(1)
		ctx := r.ctx
		if ctx == nil {
			ctx = context.Background()
		}
		timer := time.NewTimer(delay)
		select {
		case <-timer.C:
		case <-ctx.Done():
			timer.Stop()
			return nil, fmt.Errorf("TPM busy (%v), gave up: %w", rc, ctx.Err())
		}
		delay = min(2*delay, retryMaxDelay)
	}
}

// responseCode returns the response code of a TPM response (Part 1, 18.8: tag, size, code).
func responseCode(rsp []byte) tpm2.TPMRC {
	if len(rsp) < 10 {
		return tpm2.TPMRCSuccess
	}
	return tpm2.TPMRC(binary.BigEndian.Uint32(rsp[6:10]))
}
