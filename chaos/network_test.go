//go:build chaos

package chaos

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// TestScenario3Network runs the agent (and its swtpm) in a network
// namespace of its own, joined to the broker's (root) namespace by a veth
// pair; a toxiproxy in the broker's namespace forwards to mosquitto. Faults
// in turn: 20 % packet loss both ways (nftables in the agent's namespace)
// for a minute, 300 ms added latency (toxiproxy), the link down for 30 s,
// then restored. Short suite: 10 s, 8 s, 8 s.
func TestScenario3Network(t *testing.T) {
	_, br, _, d, tr := setup(t)
	ns := newNetns(t)
	tpmURL := startSwtpmIn(t, ns, d.Swtpm)

	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	px := toxiproxy.NewProxy(srv, "broker", net.JoinHostPort(ns.HostIP, "0"), br.Addr())
	if err := px.Start(); err != nil {
		t.Fatalf("toxiproxy: %v", err)
	}
	t.Cleanup(px.Stop)
	_, port, _ := net.SplitHostPort(px.Listen)

	cfg := writeConfig(t, d, confOpts{URL: "mqtts://" + net.JoinHostPort(ns.HostIP, port), ServerName: "localhost", TPM: tpmURL})
	a := newAgent(t, d, cfg, ns.Name)
	a.start()
	if !a.waitConnected(15 * time.Second) {
		t.Fatalf("agent never connected through %s:\n%s", px.Listen, tail(a.log, 3000))
	}
	s := startStream(t, tr, a.sock, 100, 50*time.Millisecond)
	time.Sleep(time.Second)

	phase := func(name string, d time.Duration) {
		before := tr.delivered()
		time.Sleep(d)
		t.Logf("%s for %v: %d readings delivered meanwhile", name, d, tr.delivered()-before)
	}
	lossFor := pick(10*time.Second, time.Minute)
	ns.loss(ns.HostIP, 20)
	phase("20% packet loss", lossFor)
	ns.clearLoss()

	latFor := pick(8*time.Second, 30*time.Second)
	if _, err := px.Toxics.AddToxicJson(strings.NewReader(`{"name":"lat","type":"latency","stream":"downstream","attributes":{"latency":300}}`)); err != nil {
		t.Fatal(err)
	}
	phase("300 ms latency", latFor)
	if err := px.Toxics.RemoveToxic(context.Background(), "lat"); err != nil {
		t.Fatal(err)
	}

	downFor := pick(8*time.Second, 30*time.Second)
	ns.link(false)
	phase("link down", downFor)
	ns.link(true)
	up := time.Now()
	rec, ok := tr.recovered(tr.mark(), up, 90*time.Second)
	if !ok {
		t.Errorf("backlog not delivered within 90 s after the link came back; %v", tr.missing())
	}
	time.Sleep(time.Second)
	note := fmt.Sprintf("loss %v, latency %v, down %v", lossFor, latFor, downFor)
	finish(t, 3, "network: 20% loss, +300 ms, link down", note, tr, s, rec, 90*time.Second, a.log)
}
