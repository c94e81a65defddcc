package testenv

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// mqttConnect sends an MQTT 3.1.1 CONNECT (clean session, no credentials)
// over conn and returns the CONNACK return code.
func mqttConnect(conn net.Conn, clientID string) (byte, error) {
	body := []byte{0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 30, byte(len(clientID) >> 8), byte(len(clientID))}
	body = append(body, clientID...)
	pkt := append([]byte{0x10, byte(len(body))}, body...)
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write(pkt); err != nil {
		return 0, err
	}
	ack := make([]byte, 4)
	if _, err := io.ReadFull(conn, ack); err != nil {
		return 0, err
	}
	if ack[0] != 0x20 || ack[1] != 2 {
		return 0, fmt.Errorf("not a CONNACK: % x", ack)
	}
	return ack[3], nil
}

// TestRabbitMQ starts a node with TLS 1.3 session tickets and checks:
// certificate login (a known CN is accepted, an unknown one refused, no
// certificate no connection), rabbitmqctl reaches the node, only loopback is
// listened on, and Stop leaves neither the node nor epmd behind. It also
// records RabbitMQ 3.10's behaviour on a resumed session: the TLS session
// resumes, but certificate login then fails (CONNACK 4), as the peer
// certificate is not kept with the ticket.
func TestRabbitMQ(t *testing.T) {
	pki := NewPKI(t, "", "lab-ca")
	r := StartRabbitMQ(t, RabbitOptions{PKI: pki, Users: []string{"dev-0001", "sub-1"}, SessionTickets: "stateless"})
	t.Logf("node %s up in %v: mqtts %d, dist %d, epmd %d", r.Node, r.StartupTime.Round(time.Millisecond), r.Port, r.DistPort, r.EPMDPort)

	dial := func(cn string, cache tls.ClientSessionCache) (*tls.Conn, byte, error) {
		cfg := &tls.Config{RootCAs: pki.Pool(), ServerName: "localhost", MinVersion: tls.VersionTLS13, ClientSessionCache: cache}
		if cn != "" {
			_, _, cert := pki.SoftClient(t, cn)
			cfg.Certificates = []tls.Certificate{cert}
		}
		conn, err := tls.Dial("tcp", r.Addr(), cfg)
		if err != nil {
			return nil, 0, err
		}
		rc, err := mqttConnect(conn, "c-"+cn)
		return conn, rc, err
	}

	cache := tls.NewLRUClientSessionCache(4)
	for _, tc := range []struct {
		name    string
		cn      string
		wantRC  byte
		resumed bool
	}{
		{"known CN", "dev-0001", 0, false},
		{"known CN, resumed session", "dev-0001", 4, true},
		{"CN without a user", "stranger", 4, false},
	} {
		c := cache
		if tc.cn == "stranger" {
			c = nil
		}
		conn, rc, err := dial(tc.cn, c)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		resumed := conn.ConnectionState().DidResume
		conn.Close()
		if rc != tc.wantRC || resumed != tc.resumed {
			t.Errorf("%s: CONNACK %d, resumed %v; want %d, %v", tc.name, rc, resumed, tc.wantRC, tc.resumed)
		}
	}

	// Without a client certificate the handshake (or the first read) fails.
	conn, _, err := dial("", nil)
	if err == nil {
		conn.Close()
		t.Fatal("node accepted a connection without a client certificate")
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("no client certificate: timeout instead of a refusal: %v", err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := r.Ctl(ctx, "list_users", "--silent")
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range []string{"dev-0001", "sub-1"} {
		if !strings.Contains(out, u) {
			t.Errorf("list_users does not show %s:\n%s", u, out)
		}
	}

	// Nothing listens beyond loopback.
	if ip := nonLoopbackIP(); ip != "" {
		for _, p := range []int{r.Port, r.DistPort, r.EPMDPort} {
			if c, err := net.DialTimeout("tcp", net.JoinHostPort(ip, strconv.Itoa(p)), time.Second); err == nil {
				c.Close()
				t.Errorf("port %d answers on %s: not loopback only", p, ip)
			}
		}
	}

	r.mu.Lock()
	epmdPid, nodePid := r.epmd.Process.Pid, r.cmd.Process.Pid
	r.mu.Unlock()
	r.Stop()
	if err := r.Alive(); err == nil {
		t.Fatal("node alive after Stop")
	}
	for name, pid := range map[string]int{"epmd": epmdPid, "node": nodePid} {
		if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err == nil {
			t.Errorf("%s (pid %d) still running after Stop", name, pid)
		}
	}
	if WaitPort(r.Addr(), 200*time.Millisecond) == nil {
		t.Fatalf("%s still accepts connections after Stop", r.Addr())
	}
	if !strings.Contains(r.LogText(), "stopped") && !strings.Contains(r.LogText(), "Stopping") {
		t.Errorf("node log shows no orderly stop (rabbitmqctl stop):\n%s", r.tail())
	}
}

// nonLoopbackIP returns an IPv4 address of this machine other than
// 127.0.0.0/8, or "".
func nonLoopbackIP() string {
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil && !n.IP.IsLoopback() {
			return n.IP.String()
		}
	}
	return ""
}
