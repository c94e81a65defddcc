package main

import (
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"

	"github.com/tpmagent/tpmagent/internal/testenv"
)

// scriptSetup keeps the script's testing.TB so that script commands can
// start real components (swtpm, mosquitto) that stop with the script.
func scriptSetup(t *testing.T) func(*testscript.Env) error {
	return func(env *testscript.Env) error {
		tb, ok := env.T().(testing.TB)
		if !ok {
			t.Fatalf("testscript env.T() is %T, not a testing.TB", env.T())
		}
		env.Values["tb"] = tb
		env.Values["state"] = &scriptState{}
		// Never read a host configuration by accident.
		env.Setenv("TPMAGENT_CONFIG_UNUSED", "1")
		return nil
	}
}

// scriptState holds what one script's commands started.
type scriptState struct {
	pki    *testenv.PKI
	notify *testenv.NotifySocket
}

func scriptStateOf(ts *testscript.TestScript) *scriptState {
	return ts.Value("state").(*scriptState)
}

func scriptTB(ts *testscript.TestScript) testing.TB {
	return ts.Value("tb").(testing.TB)
}

// scriptCmds are the commands scripts may use beyond testscript's own:
//
//	swtpm                 start a swtpm; sets TPMAGENT_TPM_DEVICE, SWTPM, TPM2TOOLS_TCTI
//	broker                start a lab PKI and a TLS mosquitto (require_certificate);
//	                      sets BROKER_URL, CA_FILE, PKI_DIR, TPMAGENT_BROKER_URLS,
//	                      TPMAGENT_BROKER_CA_FILE
//	signcsr CSR OUT [CN]  sign a PEM CSR with the lab CA into OUT (1 day)
//	notify                listen on a NOTIFY_SOCKET (sets NOTIFY_SOCKET) like systemd
//	waitnotify MSG [DUR]  wait until a datagram line starting with MSG arrived (default 20s)
//	sleep DURATION        wait
func scriptCmds() map[string]func(ts *testscript.TestScript, neg bool, args []string) {
	return map[string]func(ts *testscript.TestScript, neg bool, args []string){
		"swtpm": func(ts *testscript.TestScript, neg bool, args []string) {
			s := testenv.StartSwtpm(scriptTB(ts))
			ts.Setenv("TPMAGENT_TPM_DEVICE", s.URL())
			ts.Setenv("SWTPM", s.URL())
			ts.Setenv("TPM2TOOLS_TCTI", s.TCTI())
		},
		"broker": func(ts *testscript.TestScript, neg bool, args []string) {
			tb := scriptTB(ts)
			dir := ts.MkAbs("pki")
			pki := testenv.NewPKI(tb, dir, "lab-ca")
			m := testenv.StartMosquitto(tb, testenv.MosquittoOptions{PKI: pki})
			ts.Setenv("BROKER_URL", m.URL())
			ts.Setenv("CA_FILE", pki.CAFile)
			ts.Setenv("PKI_DIR", dir)
			ts.Setenv("BROKER_LOG", m.Log)
			ts.Setenv("TPMAGENT_BROKER_URLS", m.URL())
			ts.Setenv("TPMAGENT_BROKER_CA_FILE", pki.CAFile)
			scriptStateOf(ts).pki = pki
		},
		"signcsr": func(ts *testscript.TestScript, neg bool, args []string) {
			if len(args) < 2 {
				ts.Fatalf("usage: signcsr CSR OUT [CN]")
			}
			pki := scriptStateOf(ts).pki
			if pki == nil {
				ts.Fatalf("signcsr: run broker first")
			}
			b, err := os.ReadFile(ts.MkAbs(args[0]))
			ts.Check(err)
			blk, _ := pem.Decode(b)
			if blk == nil {
				ts.Fatalf("signcsr: %s holds no PEM block", args[0])
			}
			csr, err := x509.ParseCertificateRequest(blk.Bytes)
			ts.Check(err)
			ts.Check(csr.CheckSignature())
			cn := csr.Subject.CommonName
			if len(args) > 2 {
				cn = args[2]
			}
			out := ts.MkAbs(args[1])
			ts.Check(os.MkdirAll(filepath.Dir(out), 0o755))
			pki.IssueClient(scriptTB(ts), cn, csr.PublicKey, time.Now().Add(-time.Minute), time.Now().Add(24*time.Hour), out)
		},
		"notify": func(ts *testscript.TestScript, neg bool, args []string) {
			n := testenv.StartNotifySocket(scriptTB(ts))
			scriptStateOf(ts).notify = n
			ts.Setenv("NOTIFY_SOCKET", n.Path)
		},
		"waitnotify": func(ts *testscript.TestScript, neg bool, args []string) {
			n := scriptStateOf(ts).notify
			if n == nil || len(args) < 1 {
				ts.Fatalf("usage: notify first, then waitnotify MSG [DURATION]")
			}
			d := 20 * time.Second
			if len(args) > 1 {
				var err error
				d, err = time.ParseDuration(args[1])
				ts.Check(err)
			}
			ts.Check(n.WaitFor(args[0], d))
		},
		"sleep": func(ts *testscript.TestScript, neg bool, args []string) {
			d, err := time.ParseDuration(args[0])
			ts.Check(err)
			time.Sleep(d)
		},
	}
}
