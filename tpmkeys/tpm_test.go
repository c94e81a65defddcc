package tpmkeys

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

func TestParseDevice(t *testing.T) {
	cases := []struct {
		in      string
		want    Device
		wantErr string
	}{
		{in: "/dev/tpmrm0", want: Device{Kind: DeviceLinux, Path: "/dev/tpmrm0"}},
		{in: "/dev/tpm0", want: Device{Kind: DeviceLinux, Path: "/dev/tpm0"}},
		{in: "/dev/tpmrm12", want: Device{Kind: DeviceLinux, Path: "/dev/tpmrm12"}},
		{in: "swtpm://127.0.0.1:2321", want: Device{Kind: DeviceSwtpm, CommandAddr: "127.0.0.1:2321", PlatformAddr: "127.0.0.1:2322"}},
		{in: "swtpm://localhost:2321?platform=4000", want: Device{Kind: DeviceSwtpm, CommandAddr: "localhost:2321", PlatformAddr: "localhost:4000"}},
		{in: "swtpm://[::1]:2321", want: Device{Kind: DeviceSwtpm, CommandAddr: "[::1]:2321", PlatformAddr: "[::1]:2322"}},
		{in: "simulator", want: Device{Kind: DeviceSimulator}},
		{in: "", wantErr: "empty"},
		{in: "/dev/sda", wantErr: "unknown form"},
		{in: "tpm0", wantErr: "unknown form"},
		{in: "mssim://127.0.0.1:2321", wantErr: "unknown form"},
		{in: "swtpm://127.0.0.1", wantErr: "needs HOST:PORT"},
		{in: "swtpm://:2321", wantErr: "needs HOST:PORT"},
		{in: "swtpm://127.0.0.1:x", wantErr: "tpm device"},
		{in: "swtpm://127.0.0.1:65535", wantErr: "command port"},
		{in: "swtpm://127.0.0.1:2321?platform=x", wantErr: "platform port"},
		{in: "swtpm://127.0.0.1:2321?plat=1", wantErr: "unknown parameter"},
		{in: "swtpm://127.0.0.1:2321/path", wantErr: "only HOST:PORT"},
	}
	for _, c := range cases {
		got, err := ParseDevice(c.in)
		if c.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), c.wantErr) || !strings.Contains(err.Error(), strconv.Quote(c.in)) ||
				!strings.Contains(err.Error(), "swtpm://HOST:PORT") {
				t.Errorf("ParseDevice(%q) error = %v, want one naming the value, %q and the accepted forms", c.in, err, c.wantErr)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("ParseDevice(%q) = %+v, %v; want %+v", c.in, got, err, c.want)
		}
	}
}

func TestOpenErrors(t *testing.T) {
	ctx := testCtx(t)
	// A port nobody listens on.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	cases := []struct {
		device string
		want   []string
	}{
		{"swtpm://" + addr, []string{addr, "cannot reach swtpm", "start it", "swtpm socket --tpm2"}},
		{"/dev/tpmrm97", []string{"/dev/tpmrm97", "no such device"}},
		{"/dev/tpmx", []string{`"/dev/tpmx"`, "accepted forms"}},
		{"simulator", []string{"only in test builds", "OpenTransport"}},
	}
	for _, c := range cases {
		tp, err := Open(ctx, c.device)
		if err == nil {
			tp.Close()
			t.Errorf("Open(%q) succeeded", c.device)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("Open(%q) = %q, does not mention %q", c.device, err, w)
			}
		}
	}
}

// flakyTPM answers the first n commands with a warning, then forwards to the real TPM.
type flakyTPM struct {
	next  transport.TPM
	rc    tpm2.TPMRC
	n     int
	calls int
}

func (f *flakyTPM) Send(cmd []byte) ([]byte, error) {
	f.calls++
	if f.n > 0 {
		f.n--
		rsp := make([]byte, 10)
		binary.BigEndian.PutUint16(rsp[0:], uint16(tpm2.TPMSTNoSessions))
		binary.BigEndian.PutUint32(rsp[2:], 10)
		binary.BigEndian.PutUint32(rsp[6:], uint32(f.rc))
		return rsp, nil
	}
	return f.next.Send(cmd)
}

func TestRetryWarnings(t *testing.T) {
	for _, rc := range []tpm2.TPMRC{tpm2.TPMRCRetry, tpm2.TPMRCYielded, tpm2.TPMRCTesting} {
		t.Run(rc.Error()[:strings.Index(rc.Error(), ":")], func(t *testing.T) {
			tpm, _ := openSim(t)
			ctx := testCtx(t)
			flaky := &flakyTPM{next: tpm.rt.next, rc: rc, n: 3}
			tpm.rt.next = flaky
			if _, err := tpm.EnsureSRK(ctx, DefaultSRKHandle); err != nil {
				t.Fatalf("EnsureSRK through 3 warnings: %v", err)
			}
			if tpm.Retries() != 3 {
				t.Fatalf("Retries() = %d, want 3", tpm.Retries())
			}
			// A TPM that keeps answering the warning: the caller sees it once ctx ends.
			flaky.n = 1 << 30
			short, cancel := context.WithTimeout(ctx, 50e6)
			defer cancel()
			if _, err := tpm.EnsureSRK(short, DefaultSRKHandle); err == nil || !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("EnsureSRK with a TPM stuck in %v: %v", rc, err)
			}
		})
	}
}

func TestNVCounter(t *testing.T) {
	tpm, _ := openSim(t)
	ctx := testCtx(t)
	c, err := tpm.NVCounter(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if c.Index() != DefaultCounterIndex {
		t.Fatalf("Index() = 0x%x", c.Index())
	}
	v0, err := c.Read(ctx)
	if err != nil || v0 != 0 {
		t.Fatalf("fresh counter reads %d, %v; want 0", v0, err)
	}
	if err := c.Increment(ctx); err != nil {
		t.Fatal(err)
	}
	v1, err := c.Read(ctx)
	if err != nil || v1 < 1 {
		t.Fatalf("after Increment: %d, %v", v1, err)
	}
	if err := c.Increment(ctx); err != nil {
		t.Fatal(err)
	}
	// Reopening finds the existing counter with its value.
	c2, err := tpm.NVCounter(ctx, DefaultCounterIndex)
	if err != nil {
		t.Fatal(err)
	}
	if v2, err := c2.Read(ctx); err != nil || v2 != v1+1 {
		t.Fatalf("after second Increment: %d, %v; want %d", v2, err, v1+1)
	}
	// AdvanceTo moves it to at least a version, never back.
	if err := c2.AdvanceTo(ctx, v1+5); err != nil {
		t.Fatal(err)
	}
	if v, _ := c2.Read(ctx); v != v1+5 {
		t.Fatalf("after AdvanceTo(%d): %d", v1+5, v)
	}
	if err := c2.AdvanceTo(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if v, _ := c2.Read(ctx); v != v1+5 {
		t.Fatalf("AdvanceTo a lower value changed it: %d", v)
	}
	// An ordinary NV index at the same place is refused.
	err = tpm.do(ctx, func(tp transport.TPM) error {
		_, err := tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHOwner, PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
			NVIndex: 0x01500101, NameAlg: tpm2.TPMAlgSHA256,
			Attributes: tpm2.TPMANV{OwnerRead: true, OwnerWrite: true, NT: tpm2.TPMNTOrdinary}, DataSize: 8,
		})}.Execute(tp)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tpm.NVCounter(ctx, 0x01500101); err == nil || !strings.Contains(err.Error(), "not a counter") {
		t.Fatalf("ordinary index as counter: %v", err)
	}
	if _, err := tpm.NVCounter(ctx, 0x81000001); err == nil {
		t.Fatal("persistent handle accepted as NV index")
	}
}
