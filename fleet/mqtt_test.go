package fleet

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/tpmagent/tpmagent/internal/testenv"
	"github.com/tpmagent/tpmagent/tpmkeys"
)

// deviceTLS is a client TLS config presenting cert with a (TPM) signer.
func deviceTLS(caFile string, signer crypto.Signer, cert *x509.Certificate) *tls.Config {
	pool := x509.NewCertPool()
	pem, _ := os.ReadFile(caFile)
	pool.AppendCertsFromPEM(pem)
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		RootCAs:    pool,
		ServerName: "localhost",
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return &tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: signer, Leaf: cert}, nil
		},
	}
}

func fleetBroker(t testing.TB, caDir, acl string) *testenv.Mosquitto {
	t.Helper()
	return testenv.StartMosquitto(t, testenv.MosquittoOptions{
		PKI: &testenv.PKI{Dir: caDir, CAFile: filepath.Join(caDir, CACertFile),
			ServerCertFile: filepath.Join(caDir, BrokerCertFile), ServerKeyFile: filepath.Join(caDir, BrokerKeyFile)},
		ACLFile: acl,
		// debug logging shows ACL decisions ("Denied PUBLISH from …").
		Extra: []string{"log_type debug"},
	})
}

func writeACL(t testing.TB, path string, ids ...string) {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "user %s\ntopic read $fleet/certificates/+/request\ntopic write $fleet/certificates/+/response\n", ServiceUser)
	for _, id := range ids {
		fmt.Fprintf(&b, "\nuser %s\ntopic readwrite devices/%s/#\ntopic write $fleet/certificates/%s/request\ntopic read $fleet/certificates/%s/response\n", id, id, id, id)
	}
	write(t, path, b.String())
}

// TestServiceOverMQTT: a device renews over the broker (new key at the renew handle,
// attested and certified through `fleet ca serve`'s Service), refusals travel back with
// their reason, and the ACL keeps a device off another device's $fleet topics.
func TestServiceOverMQTT(t *testing.T) {
	ctx := ctxT(t)
	m := newManufacturer(t)
	d := newDevice(t, m, "dev-a")
	svc, caDir := newService(t, m)
	_, cert, err := Enrol(ctx, d.attester(), LocalRequester{Service: svc})
	if err != nil {
		t.Fatal(err)
	}
	acl := filepath.Join(t.TempDir(), "acl")
	writeACL(t, acl, "dev-a", "dev-b")
	broker := fleetBroker(t, caDir, acl)

	pair, err := tls.LoadX509KeyPair(filepath.Join(caDir, ServiceCertFile), filepath.Join(caDir, ServiceKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	svcTLS := deviceTLS(filepath.Join(caDir, CACertFile), nil, nil)
	svcTLS.GetClientCertificate = nil
	svcTLS.Certificates = []tls.Certificate{pair}
	sctx, stop := context.WithCancel(ctx)
	ready := make(chan struct{}, 1)
	served := make(chan error, 1)
	go func() { served <- svc.Serve(sctx, ServeOptions{BrokerURL: broker.URL(), TLS: svcTLS, Ready: ready}) }()
	t.Cleanup(func() { stop(); <-served })
	select {
	case <-ready:
	case err := <-served:
		t.Fatalf("Serve: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("service did not subscribe")
	}

	devTLS := deviceTLS(filepath.Join(caDir, CACertFile), d.key, cert)
	req, err := NewMQTTRequester(ctx, MQTTRequesterOptions{BrokerURL: broker.URL(), TLS: devTLS, DeviceID: "dev-a", Timeout: 15 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer req.Close()

	// A forged bundle is refused, and the reason arrives over MQTT.
	bad, err := d.tpm.Attest(ctx, d.key, "dev-a", nil)
	if err != nil {
		t.Fatal(err)
	}
	bad.CSR = softCSR(t, "dev-a")
	if _, err := req.Submit(ctx, bad); ReasonOf(err) != ReasonCSRMismatch {
		t.Fatalf("forged bundle over MQTT: %v, want %s", err, ReasonCSRMismatch)
	} else {
		t.Logf("refused over MQTT: %v", err)
	}

	// Renewal: a new key at the renew handle, certified over MQTT; the current key is untouched.
	const renewHandle = 0x81000101
	ren, err := PrepareRenewal(ctx, RenewOptions{TPM: d.tpm, DeviceID: "dev-a", Spec: tpmkeys.KeySpec{Handle: renewHandle}, Requester: req})
	if err != nil {
		t.Fatalf("PrepareRenewal: %v", err)
	}
	defer ren.Key.Close()
	if samePublic(ren.Cert.PublicKey, d.key.Public()) || !samePublic(ren.Cert.PublicKey, ren.Key.Public()) {
		t.Fatal("renewed certificate is not for the new key")
	}
	if ren.Key.Handle() != renewHandle || ren.Cert.Subject.CommonName != "dev-a" {
		t.Fatalf("renewal: handle 0x%x CN %s", ren.Key.Handle(), ren.Cert.Subject.CommonName)
	}
	// The new pair works on the broker.
	c := mqtt.NewClient(mqtt.NewClientOptions().AddBroker(brokerURL(broker.URL())).SetClientID("dev-a-new").
		SetTLSConfig(deviceTLS(filepath.Join(caDir, CACertFile), ren.Key, ren.Cert)))
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connect with the renewed identity: %v", tok.Error())
	}
	c.Disconnect(0)
	// Dropping the old key after the switch.
	if removed, err := d.tpm.EvictKey(ctx, tpmkeys.DefaultKeyHandle); err != nil || !removed {
		t.Fatalf("EvictKey: %v %v", removed, err)
	}
	if ok, _ := d.tpm.KeyPresent(ctx, tpmkeys.DefaultKeyHandle); ok {
		t.Fatal("old key still present")
	}

	// dev-a's identity cannot use dev-b's topics: the broker drops its publish on dev-b's
	// request topic (and would not deliver dev-b's responses), so no answer ever comes.
	asB, err := NewMQTTRequester(ctx, MQTTRequesterOptions{BrokerURL: broker.URL(), TLS: deviceTLS(filepath.Join(caDir, CACertFile), ren.Key, ren.Cert),
		DeviceID: "dev-b", ClientID: "dev-a-as-b", Timeout: 2 * time.Second})
	if err == nil {
		bb := *bad
		bb.DeviceID = "dev-b"
		_, err = asB.Submit(ctx, &bb)
		asB.Close()
	}
	if err == nil || ReasonOf(err) != "" {
		t.Fatalf("dev-a on dev-b's topics got an answer: %v", err)
	}
	t.Logf("dev-a on dev-b's topics: %v", err)
	if !strings.Contains(broker.LogText(), "Denied PUBLISH from dev-a-as-b") {
		t.Fatalf("the broker log does not show the ACL denial:\n%s", broker.LogText())
	}

	// A CA service that is down: the request times out with a clear message, nothing changes.
	stop()
	<-served
	served <- nil
	down, err := NewMQTTRequester(ctx, MQTTRequesterOptions{BrokerURL: broker.URL(), TLS: deviceTLS(filepath.Join(caDir, CACertFile), ren.Key, ren.Cert),
		DeviceID: "dev-a", ClientID: "dev-a-2", Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer down.Close()
	_, err = PrepareRenewal(ctx, RenewOptions{TPM: d.tpm, DeviceID: "dev-a", Spec: tpmkeys.KeySpec{Handle: 0x81000102}, Requester: down})
	if err == nil || !strings.Contains(err.Error(), "fleet ca serve") {
		t.Fatalf("renewal with the CA down: %v", err)
	}
	if ok, _ := d.tpm.KeyPresent(ctx, 0x81000102); ok {
		t.Fatal("failed renewal left its key in the TPM")
	}
	if ok, _ := d.tpm.KeyPresent(ctx, renewHandle); !ok {
		t.Fatal("failed renewal touched the current key")
	}
}
