package testenv

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// RabbitOptions configures a test RabbitMQ node.
type RabbitOptions struct {
	// PKI provides the CA and the server certificate. Required.
	PKI *PKI
	// Users are the certificate common names allowed to log in: each gets a
	// RabbitMQ user of that name (no password: certificate login only) with
	// configure/write/read permissions on the vhost "/". RabbitMQ refuses a
	// client certificate whose CN has no user.
	Users []string
	// Port is the MQTT TLS port; 0 picks a free one.
	Port int
	// SessionTickets is Erlang's TLS 1.3 session_tickets server option:
	// "" (RabbitMQ's default: no tickets, every connection is a full
	// handshake), "stateless" or "stateful". rabbitmq.conf has no key for
	// it: it goes to advanced.config. Note that RabbitMQ 3.10 (Erlang 25)
	// refuses certificate login on a resumed connection (CONNACK 4: the
	// peer certificate is not known then); see docs/BROKERS.md.
	SessionTickets string
	// Extra lines appended to rabbitmq.conf.
	Extra []string
}

// RabbitMQ is a running RabbitMQ node (Debian rabbitmq-server) with the
// rabbitmq_mqtt plugin listening for MQTT over TLS on 127.0.0.1 only. Clients
// must present a certificate from the PKI's CA; the CN is the user name
// (mqtt.ssl_cert_login, ssl_cert_login_from = common_name). The AMQP and the
// plain MQTT listeners are off. Its own epmd runs on a free port (started
// and stopped here, never left behind), Erlang distribution listens on a free
// loopback port, and every file (config, Mnesia, logs, HOME with the Erlang
// cookie) lives under t.TempDir(). Stop (registered with t.Cleanup) stops the
// node with rabbitmqctl and then epmd.
type RabbitMQ struct {
	t    testing.TB
	opts RabbitOptions

	// Dir holds everything of this node.
	Dir string
	// Node is the Erlang node name, e.g. "tpmagent-41234@localhost".
	Node string
	// Port is the MQTT TLS port on 127.0.0.1.
	Port int
	// DistPort and EPMDPort are the Erlang distribution and epmd ports.
	DistPort, EPMDPort int
	// StartupTime is how long the node took to accept TLS connections.
	StartupTime time.Duration

	env []string

	mu         sync.Mutex
	cmd        *exec.Cmd
	exited     chan struct{}
	epmd       *exec.Cmd
	epmdExited chan struct{}
}

// rabbitStartTimeout bounds a node's boot (it listens after ≈ 10 s here).
const rabbitStartTimeout = 60 * time.Second

// rabbitServer is the node's start script without the Debian wrapper that
// switches to user rabbitmq and logs under /var/log.
const rabbitServer = "/usr/lib/rabbitmq/bin/rabbitmq-server"

// StartRabbitMQ writes the node's configuration under t.TempDir(), starts
// epmd and the node on free loopback ports and waits (≤ 60 s) until the MQTT
// TLS listener answers with a certificate from opts.PKI. It fails the test,
// with the log, when RabbitMQ is not installed or does not come up.
func StartRabbitMQ(t testing.TB, opts RabbitOptions) *RabbitMQ {
	t.Helper()
	if _, err := os.Stat(rabbitServer); err != nil {
		t.Fatalf("testenv: %s not found (%v): install RabbitMQ with `apt-get install -y rabbitmq-server` (scripts/ci-deps.sh does)", rabbitServer, err)
	}
	NeedTool(t, "epmd", "erlang-base")
	if opts.PKI == nil {
		t.Fatal("testenv: RabbitOptions.PKI is required")
	}
	r := &RabbitMQ{t: t, opts: opts, Dir: t.TempDir()}
	t.Cleanup(r.Stop)
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		if attempt > 0 {
			t.Logf("testenv: rabbitmq attempt %d failed, retrying on other ports: %v", attempt, lastErr)
			r.Stop()
			r.Dir = t.TempDir()
		}
		if lastErr = r.start(); lastErr == nil {
			return r
		}
		if opts.Port != 0 {
			break // a fixed port will not get free by retrying
		}
	}
	t.Fatalf("testenv: start rabbitmq: %v", lastErr)
	return nil
}

// start picks ports, writes the files and boots epmd and the node.
func (r *RabbitMQ) start() error {
	r.Port = r.opts.Port
	if r.Port == 0 {
		r.Port = FreePort(r.t)
	}
	// Free ports for distribution and epmd (ctlEnv gives each rabbitmqctl its
	// own too): parallel nodes never meet on RabbitMQ's fixed defaults
	// (25672, 4369, 35672–35682).
	r.DistPort = FreePort(r.t)
	r.EPMDPort = FreePort(r.t)
	r.Node = fmt.Sprintf("tpmagent-%d@localhost", r.Port)
	home := filepath.Join(r.Dir, "home")
	for _, d := range []string{home, filepath.Join(r.Dir, "mnesia"), filepath.Join(r.Dir, "log")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	if err := r.writeFiles(); err != nil {
		return err
	}
	r.env = []string{
		"PATH=" + os.Getenv("PATH"),
		"HOME=" + home,
		"LANG=C.UTF-8", "LC_ALL=C.UTF-8",
		"RABBITMQ_CONF_ENV_FILE=" + filepath.Join(r.Dir, "rabbitmq-env.conf"),
		"RABBITMQ_CONFIG_FILE=" + filepath.Join(r.Dir, "rabbitmq"), // .conf is appended
		"RABBITMQ_ADVANCED_CONFIG_FILE=" + filepath.Join(r.Dir, "advanced.config"),
		"RABBITMQ_ENABLED_PLUGINS_FILE=" + filepath.Join(r.Dir, "enabled_plugins"),
		"RABBITMQ_MNESIA_BASE=" + filepath.Join(r.Dir, "mnesia"),
		"RABBITMQ_LOG_BASE=" + filepath.Join(r.Dir, "log"),
		"RABBITMQ_PID_FILE=" + filepath.Join(r.Dir, "rabbitmq.pid"),
		"RABBITMQ_NODENAME=" + r.Node,
		"RABBITMQ_DIST_PORT=" + strconv.Itoa(r.DistPort),
		"ERL_EPMD_PORT=" + strconv.Itoa(r.EPMDPort),
		"ERL_EPMD_ADDRESS=127.0.0.1",
		// epmd is ours (startEPMD); distribution on loopback only.
		"RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-start_epmd false -kernel inet_dist_use_interface {127,0,0,1}",
		// Run the VM in place of the script (so Pdeathsig reaches it); -noinput is
		// passed as an argument instead.
		"RABBITMQ_ALLOW_INPUT=true",
	}
	if err := r.startEPMD(); err != nil {
		return err
	}
	return r.startNode()
}

// writeFiles writes rabbitmq.conf, advanced.config, enabled_plugins, the
// definitions (users, permissions) and an empty rabbitmq-env.conf (so that
// /etc/rabbitmq/rabbitmq-env.conf is not read).
func (r *RabbitMQ) writeFiles() error {
	defs := filepath.Join(r.Dir, "definitions.json")
	conf := []string{
		"# written by internal/testenv",
		"listeners.tcp = none",
		"mqtt.listeners.tcp = none",
		"mqtt.listeners.ssl.default = 127.0.0.1:" + strconv.Itoa(r.Port),
		"mqtt.allow_anonymous = false",
		"mqtt.ssl_cert_login = true",
		"ssl_cert_login_from = common_name",
		"mqtt.vhost = /",
		"mqtt.exchange = amq.topic",
		"mqtt.tcp_listen_options.nodelay = true",
		"definitions.import_backend = local_filesystem",
		"definitions.local.path = " + defs,
		"log.file.level = info",
		"log.console = false",
		// The test machine's disk may be nearly full; do not block publishers.
		"disk_free_limit.absolute = 1MB",
	}
	conf = append(conf, r.opts.Extra...)
	// TLS options go to advanced.config: rabbitmq.conf cannot set
	// session_tickets, and the two files do not merge inside ssl_options.
	sslOpts := []string{
		fmt.Sprintf("{cacertfile, %q}", r.opts.PKI.CAFile),
		fmt.Sprintf("{certfile, %q}", r.opts.PKI.ServerCertFile),
		fmt.Sprintf("{keyfile, %q}", r.opts.PKI.ServerKeyFile),
		"{verify, verify_peer}",
		"{fail_if_no_peer_cert, true}",
		"{versions, ['tlsv1.3', 'tlsv1.2']}",
	}
	switch r.opts.SessionTickets {
	case "":
	case "stateless", "stateful":
		sslOpts = append(sslOpts, "{session_tickets, "+r.opts.SessionTickets+"}")
	default:
		return fmt.Errorf("RabbitOptions.SessionTickets %q: want \"\", \"stateless\" or \"stateful\"", r.opts.SessionTickets)
	}
	advanced := "[{rabbit, [{ssl_options, [" + strings.Join(sslOpts, ", ") + "]}]}].\n"

	type user struct {
		Name         string   `json:"name"`
		PasswordHash string   `json:"password_hash"`
		Hashing      string   `json:"hashing_algorithm"`
		Tags         []string `json:"tags"`
	}
	type perm struct {
		User      string `json:"user"`
		Vhost     string `json:"vhost"`
		Configure string `json:"configure"`
		Write     string `json:"write"`
		Read      string `json:"read"`
	}
	d := struct {
		Users       []user              `json:"users"`
		Vhosts      []map[string]string `json:"vhosts"`
		Permissions []perm              `json:"permissions"`
	}{Users: []user{}, Vhosts: []map[string]string{{"name": "/"}}, Permissions: []perm{}}
	for _, u := range r.opts.Users {
		d.Users = append(d.Users, user{Name: u, Hashing: "rabbit_password_hashing_sha256", Tags: []string{}})
		d.Permissions = append(d.Permissions, perm{User: u, Vhost: "/", Configure: ".*", Write: ".*", Read: ".*"})
	}
	js, err := json.MarshalIndent(d, "", "  ")
	if err != nil {
		return err
	}
	for name, body := range map[string]string{
		"rabbitmq.conf":     strings.Join(conf, "\n") + "\n",
		"advanced.config":   advanced,
		"enabled_plugins":   "[rabbitmq_mqtt].\n",
		"definitions.json":  string(js),
		"rabbitmq-env.conf": "# empty: keep /etc/rabbitmq/rabbitmq-env.conf out of tests\n",
	} {
		if err := os.WriteFile(filepath.Join(r.Dir, name), []byte(body), 0o600); err != nil {
			return fmt.Errorf("write %s: %w", name, err)
		}
	}
	return nil
}

// startEPMD starts epmd in the foreground on EPMDPort (loopback only) as our
// child, so that no `epmd -daemon` outlives the test.
func (r *RabbitMQ) startEPMD() error {
	cmd := exec.Command("epmd", "-port", strconv.Itoa(r.EPMDPort), "-address", "127.0.0.1")
	out, err := os.Create(filepath.Join(r.Dir, "epmd.log"))
	if err != nil {
		return err
	}
	cmd.Stdin = nil
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		out.Close()
		return fmt.Errorf("exec epmd: %w", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); out.Close(); close(exited) }()
	r.mu.Lock()
	r.epmd, r.epmdExited = cmd, exited
	r.mu.Unlock()
	addr := "127.0.0.1:" + strconv.Itoa(r.EPMDPort)
	if err := WaitPort(addr, 5*time.Second); err != nil {
		b, _ := os.ReadFile(filepath.Join(r.Dir, "epmd.log"))
		return fmt.Errorf("epmd did not listen on %s: %v: %s", addr, err, b)
	}
	select {
	case <-exited:
		b, _ := os.ReadFile(filepath.Join(r.Dir, "epmd.log"))
		return fmt.Errorf("epmd on port %d exited (port taken?): %s", r.EPMDPort, b)
	default:
	}
	return nil
}

// startNode boots the node and waits until its TLS listener presents our
// server certificate.
func (r *RabbitMQ) startNode() error {
	begin := time.Now()
	cmd := exec.Command(rabbitServer, "-noinput")
	cmd.Env = r.env
	cmd.Dir = r.Dir
	out, err := os.Create(filepath.Join(r.Dir, "stdout.log"))
	if err != nil {
		return err
	}
	cmd.Stdin = nil // /dev/null
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		out.Close()
		return fmt.Errorf("exec %s: %w", rabbitServer, err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); out.Close(); close(exited) }()
	r.mu.Lock()
	r.cmd, r.exited = cmd, exited
	r.mu.Unlock()

	deadline := time.Now().Add(rabbitStartTimeout)
	for {
		select {
		case <-exited:
			return fmt.Errorf("node %s exited during boot:\n%s", r.Node, r.tail())
		default:
		}
		// The MQTT listener opens a few ms before the definitions (users)
		// are imported: wait for the end of the boot as well.
		err := r.probe()
		if err == nil && !strings.Contains(r.LogText(), "Server startup complete") {
			err = errors.New("listening, boot not complete yet")
		}
		if err == nil {
			r.StartupTime = time.Since(begin)
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("node %s: MQTT TLS listener %s not up after %v (%v):\n%s", r.Node, r.Addr(), rabbitStartTimeout, err, r.tail())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// probe completes a TLS handshake with the listener and checks that the
// server certificate comes from our CA (so another process that grabbed the
// port does not pass for the node). TLS 1.3 lets the client finish before
// the server has judged the (absent) client certificate.
func (r *RabbitMQ) probe() error {
	d := &net.Dialer{Timeout: 500 * time.Millisecond}
	c, err := tls.DialWithDialer(d, "tcp", r.Addr(), &tls.Config{RootCAs: r.opts.PKI.Pool(), ServerName: "localhost", MinVersion: tls.VersionTLS13})
	if err != nil {
		return err
	}
	return c.Close()
}

// tail returns the end of the node's logs for failure messages.
func (r *RabbitMQ) tail() string {
	var b strings.Builder
	for _, f := range []string{filepath.Join(r.Dir, "stdout.log"), r.LogFile()} {
		data, _ := os.ReadFile(f)
		if len(data) > 6000 {
			data = data[len(data)-6000:]
		}
		fmt.Fprintf(&b, "--- %s\n%s\n", f, data)
	}
	return b.String()
}

// Addr is 127.0.0.1:PORT (MQTT over TLS).
func (r *RabbitMQ) Addr() string { return "127.0.0.1:" + strconv.Itoa(r.Port) }

// URL is mqtts://127.0.0.1:PORT.
func (r *RabbitMQ) URL() string { return "mqtts://" + r.Addr() }

// LogFile is the node's main log file.
func (r *RabbitMQ) LogFile() string {
	return filepath.Join(r.Dir, "log", r.Node+".log")
}

// LogText returns the node's log so far (connections name the user, i.e.
// the certificate CN).
func (r *RabbitMQ) LogText() string {
	b, _ := os.ReadFile(r.LogFile())
	return string(b)
}

// ctlEnv is the node's environment plus a free distribution port for the
// CLI itself.
func (r *RabbitMQ) ctlEnv() []string {
	p := strconv.Itoa(FreePort(r.t))
	return append(append([]string(nil), r.env...),
		"RABBITMQ_CTL_DIST_PORT_MIN="+p, "RABBITMQ_CTL_DIST_PORT_MAX="+p,
		"RABBITMQ_CTL_ERL_ARGS=-start_epmd false")
}

// Ctl runs rabbitmqctl against this node (same HOME, cookie, epmd port) and
// returns its combined output.
func (r *RabbitMQ) Ctl(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "/usr/lib/rabbitmq/bin/rabbitmqctl", append([]string{"-n", r.Node}, args...)...)
	cmd.Env = r.ctlEnv()
	cmd.Dir = r.Dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("rabbitmqctl %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// AddUser creates a certificate-login user cn with all permissions on "/"
// on the running node (users known at start belong in RabbitOptions.Users,
// which costs nothing; each rabbitmqctl call boots an Erlang VM, ≈ 1–2 s).
func (r *RabbitMQ) AddUser(t testing.TB, cn string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// A random password nobody knows: MQTT logins use the certificate.
	if _, err := r.Ctl(ctx, "add_user", cn, fmt.Sprintf("x-%d", time.Now().UnixNano())); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	if _, err := r.Ctl(ctx, "set_permissions", "-p", "/", cn, ".*", ".*", ".*"); err != nil {
		t.Fatalf("testenv: %v", err)
	}
}

// Stop stops the node with `rabbitmqctl stop` (SIGTERM, then SIGKILL of its
// process group if that does not end it within 20 s), then stops epmd. Safe
// to call more than once; StartRabbitMQ registers it with t.Cleanup.
func (r *RabbitMQ) Stop() {
	r.mu.Lock()
	cmd, exited := r.cmd, r.exited
	epmd, epmdExited := r.epmd, r.epmdExited
	r.cmd, r.exited, r.epmd, r.epmdExited = nil, nil, nil, nil
	r.mu.Unlock()
	if cmd != nil {
		select {
		case <-exited:
		default:
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			_, err := r.Ctl(ctx, "stop")
			cancel()
			if err != nil {
				r.t.Logf("testenv: %v; sending SIGTERM to %s", err, r.Node)
				_ = cmd.Process.Signal(syscall.SIGTERM)
			}
			select {
			case <-exited:
			case <-time.After(20 * time.Second):
				r.t.Logf("testenv: rabbitmq node %s did not stop within 20 s: SIGKILL", r.Node)
			}
		}
		// Helpers the VM started (erl_child_setup, inet_gethost) share its group.
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exited
	}
	if epmd != nil {
		_ = epmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-epmdExited:
		case <-time.After(5 * time.Second):
			_ = epmd.Process.Kill()
			<-epmdExited
		}
	}
}

// ErrRabbitStopped is returned by Alive after Stop.
var ErrRabbitStopped = errors.New("testenv: rabbitmq node stopped")

// Alive reports nil while the node process runs.
func (r *RabbitMQ) Alive() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cmd == nil {
		return ErrRabbitStopped
	}
	select {
	case <-r.exited:
		return fmt.Errorf("testenv: rabbitmq node %s exited", r.Node)
	default:
		return nil
	}
}
