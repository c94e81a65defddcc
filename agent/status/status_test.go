package status

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestServeAndFetch(t *testing.T) {
	var c Counters
	c.ReadingsIn.Add(7)
	c.ReadingsRejected.Add(2)
	c.MessagesAcked.Add(3)
	c.TPMSignatures = func() uint64 { return 1 }
	c.Broker = func() string { return "mqtts://127.0.0.1:8883" }
	c.SpoolStats = func() Spool { return Spool{Records: 5, Bytes: 100, Dropped: 4} }
	c.SetError(errors.New("boom"))
	path := filepath.Join(t.TempDir(), "run", "status.sock")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, path, &c, nil) }()
	var s Snapshot
	var err error
	for i := 0; i < 100; i++ {
		if s, err = Fetch(ctx, path); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	if s.ReadingsIn != 7 || s.ReadingsRejected != 2 || s.MessagesAcked != 3 || s.TPMSignatures != 1 ||
		s.Spool.Records != 5 || s.Drops != 4 || !s.Connected || s.LastError != "boom" {
		t.Fatalf("snapshot %+v", s)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket mode %v, %v; want 0660", fi.Mode(), err)
	}
	// A second listener on a live socket is refused.
	if _, err := ListenUnix(path, 0o660); err == nil || !strings.Contains(err.Error(), "already running") {
		t.Fatalf("second listen: %v", err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket left behind: %v", err)
	}
}

func TestFetchNoAgent(t *testing.T) {
	_, err := Fetch(context.Background(), filepath.Join(t.TempDir(), "none.sock"))
	if err == nil || !strings.Contains(err.Error(), "tpmagent run") {
		t.Fatalf("Fetch without agent: %v", err)
	}
}
