package daemon

import (
	"context"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/tpmagent/tpmagent/agent/source"
	"github.com/tpmagent/tpmagent/internal/testdevice"
	"github.com/tpmagent/tpmagent/internal/testenv"
)

// TestRunPublishesToRabbitMQ runs the daemon (key in swtpm, mTLS 1.3)
// against RabbitMQ with the rabbitmq_mqtt plugin and certificate login
// instead of mosquitto: readings sent to its socket reach a subscriber, and
// the node shows the agent's MQTT connection logged in as the certificate's
// CN over TLS 1.3.
func TestRunPublishesToRabbitMQ(t *testing.T) {
	n := listenNotify(t)
	pki := testenv.NewPKI(t, "", "lab-ca")
	node := testenv.StartRabbitMQ(t, testenv.RabbitOptions{PKI: pki, Users: []string{"dev-0001", "subscriber"}})
	t.Logf("RabbitMQ node %s up in %v", node.Node, node.StartupTime.Round(time.Millisecond))
	d := testdevice.New(t, testdevice.Options{PKI: pki})
	d.Config.Broker.URLs = []string{node.URL()}
	readings, _ := subscribe(t, d, node.URL(), "devices/"+d.ID+"/telemetry")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, Options{Config: d.Config, Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})), StatusInterval: 200 * time.Millisecond})
	}()
	waitSocket(t, d.Config.Telemetry.Socket)
	n.waitFor(t, "READY=1", 20*time.Second)

	const total = 5000
	start := time.Now()
	sctx, scancel := context.WithTimeout(ctx, 30*time.Second)
	ok, rejected, err := source.Send(sctx, d.Config.Telemetry.Socket, strings.NewReader(lines(0, total)), nil)
	scancel()
	if err != nil || ok != total || rejected != 0 {
		t.Fatalf("send: ok %d rejected %d err %v", ok, rejected, err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for readings() < total && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if got := readings(); got != total {
		t.Fatalf("subscriber received %d of %d readings through RabbitMQ", got, total)
	}
	t.Logf("%d readings socket → spool → RabbitMQ → subscriber in %v", total, time.Since(start).Round(time.Millisecond))

	// The node's view of the agent: user = certificate CN, TLS 1.3.
	cctx, ccancel := context.WithTimeout(ctx, 30*time.Second)
	out, err := node.Ctl(cctx, "list_mqtt_connections", "--silent", "client_id", "user", "ssl", "ssl_protocol")
	ccancel()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "dev-0001\tdev-0001\ttrue\ttlsv1.3") {
		t.Errorf("RabbitMQ does not list the agent as client dev-0001, user dev-0001 over TLS 1.3:\n%s", out)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("run did not stop after cancel")
	}
	n.waitFor(t, "STOPPING=1", time.Second)
}
