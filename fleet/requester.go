package fleet

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/tpmagent/tpmagent/tpmkeys"
)

// Attester is the device side of enrolment: it makes a bundle and answers the challenge.
// KeyAttester implements it with a TPM.
type Attester interface {
	Attest(ctx context.Context) (*tpmkeys.AttestationBundle, error)
	ActivateCredential(ctx context.Context, ch *tpmkeys.Challenge) (*tpmkeys.ActivationResponse, error)
}

// KeyAttester attests Key of TPM for DeviceID (the CSR's CN) with optional DNS SANs.
type KeyAttester struct {
	TPM      *tpmkeys.TPM
	Key      *tpmkeys.Key
	DeviceID string
	DNS      []string
}

// Attest implements Attester.
func (k *KeyAttester) Attest(ctx context.Context) (*tpmkeys.AttestationBundle, error) {
	return k.TPM.Attest(ctx, k.Key, k.DeviceID, k.DNS)
}

// ActivateCredential implements Attester.
func (k *KeyAttester) ActivateCredential(ctx context.Context, ch *tpmkeys.Challenge) (*tpmkeys.ActivationResponse, error) {
	return k.TPM.ActivateCredential(ctx, ch)
}

// CertRequester carries the two enrolment steps to a CA: submit a bundle and get its
// challenge; answer the challenge and get the certificate (PEM, leaf first).
type CertRequester interface {
	Submit(ctx context.Context, b *tpmkeys.AttestationBundle) (*tpmkeys.Challenge, error)
	Complete(ctx context.Context, r *tpmkeys.ActivationResponse) (certPEM []byte, err error)
}

// Enrol runs the whole exchange: attest, submit, activate, complete. It returns the issued
// certificate (PEM) after checking that it certifies the attested key.
func Enrol(ctx context.Context, a Attester, r CertRequester) ([]byte, *x509.Certificate, error) {
	b, err := a.Attest(ctx)
	if err != nil {
		return nil, nil, err
	}
	ch, err := r.Submit(ctx, b)
	if err != nil {
		return nil, nil, err
	}
	resp, err := a.ActivateCredential(ctx, ch)
	if err != nil {
		return nil, nil, err
	}
	certPEM, err := r.Complete(ctx, resp)
	if err != nil {
		return nil, nil, err
	}
	cert, err := parseLeaf(certPEM)
	if err != nil {
		return nil, nil, err
	}
	csr, err := x509.ParseCertificateRequest(b.CSR)
	if err != nil {
		return nil, nil, err
	}
	if !samePublic(cert.PublicKey, csr.PublicKey) {
		return nil, nil, fmt.Errorf("fleet: the CA returned a certificate for another key (CN %s)", cert.Subject.CommonName)
	}
	return certPEM, cert, nil
}

func parseLeaf(certPEM []byte) (*x509.Certificate, error) {
	blk, _ := pem.Decode(certPEM)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, errors.New("fleet: the CA's answer holds no PEM certificate")
	}
	return x509.ParseCertificate(blk.Bytes)
}

// LocalRequester talks to an in-process Service (the lab's one-process enrolment, tests).
type LocalRequester struct{ Service *Service }

// Submit implements CertRequester.
func (l LocalRequester) Submit(_ context.Context, b *tpmkeys.AttestationBundle) (*tpmkeys.Challenge, error) {
	return l.Service.Submit("", b)
}

// Complete implements CertRequester.
func (l LocalRequester) Complete(_ context.Context, r *tpmkeys.ActivationResponse) ([]byte, error) {
	cert, err := l.Service.Complete("", r)
	if err != nil {
		return nil, err
	}
	return EncodeCertPEM(cert), nil
}

// MQTTRequester talks to `tpmagent fleet ca serve` over the broker: it publishes on
// $fleet/certificates/<id>/request and reads $fleet/certificates/<id>/response. The TLS
// config carries the device's current identity (renewal) or a bootstrap identity allowed
// to use that device's topics.
type MQTTRequester struct {
	client   mqtt.Client
	deviceID string
	timeout  time.Duration

	mu      sync.Mutex
	waiters map[string]chan Message
}

// MQTTRequesterOptions configures NewMQTTRequester.
type MQTTRequesterOptions struct {
	BrokerURL string
	TLS       *tls.Config
	DeviceID  string
	// ClientID defaults to "<device id>-enrol".
	ClientID string
	// Timeout per request (default 30 s).
	Timeout time.Duration
}

// NewMQTTRequester connects to the broker and subscribes to the device's response topic.
// Close it when done.
func NewMQTTRequester(ctx context.Context, o MQTTRequesterOptions) (*MQTTRequester, error) {
	if o.DeviceID == "" {
		return nil, errors.New("fleet: MQTT requester: empty device id")
	}
	if o.ClientID == "" {
		o.ClientID = o.DeviceID + "-enrol"
	}
	if o.Timeout <= 0 {
		o.Timeout = 30 * time.Second
	}
	r := &MQTTRequester{deviceID: o.DeviceID, timeout: o.Timeout, waiters: make(map[string]chan Message)}
	opts := mqtt.NewClientOptions().AddBroker(brokerURL(o.BrokerURL)).SetClientID(o.ClientID).
		SetTLSConfig(o.TLS).SetCleanSession(true).SetAutoReconnect(false).SetOrderMatters(false).
		SetConnectTimeout(o.Timeout)
	r.client = mqtt.NewClient(opts)
	if err := waitToken(ctx, r.client.Connect(), o.Timeout); err != nil {
		return nil, fmt.Errorf("fleet: connect to %s as %s: %w", o.BrokerURL, o.DeviceID, err)
	}
	st := r.client.Subscribe(ResponseTopic(o.DeviceID), 1, r.onMessage)
	err := waitToken(ctx, st, o.Timeout)
	if err == nil {
		if res, ok := st.(*mqtt.SubscribeToken); ok && res.Result()[ResponseTopic(o.DeviceID)] == 0x80 {
			err = errors.New("the broker refused the subscription: its ACL does not give this identity that device's topics")
		}
	}
	if err != nil {
		r.client.Disconnect(0)
		return nil, fmt.Errorf("fleet: subscribe %s: %w", ResponseTopic(o.DeviceID), err)
	}
	return r, nil
}

func waitToken(ctx context.Context, t mqtt.Token, timeout time.Duration) error {
	select {
	case <-t.Done():
		return t.Error()
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(timeout):
		return fmt.Errorf("no answer within %v", timeout)
	}
}

func (r *MQTTRequester) onMessage(_ mqtt.Client, msg mqtt.Message) {
	var m Message
	if json.Unmarshal(msg.Payload(), &m) != nil {
		return
	}
	r.mu.Lock()
	ch := r.waiters[m.Nonce]
	delete(r.waiters, m.Nonce)
	r.mu.Unlock()
	if ch != nil {
		ch <- m
	}
}

func (r *MQTTRequester) roundTrip(ctx context.Context, m Message) (Message, error) {
	nb := make([]byte, 12)
	_, _ = rand.Read(nb)
	m.Nonce = hex.EncodeToString(nb)
	ch := make(chan Message, 1)
	r.mu.Lock()
	r.waiters[m.Nonce] = ch
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.waiters, m.Nonce)
		r.mu.Unlock()
	}()
	payload, err := json.Marshal(m)
	if err != nil {
		return Message{}, err
	}
	if err := waitToken(ctx, r.client.Publish(RequestTopic(r.deviceID), 1, false, payload), r.timeout); err != nil {
		return Message{}, fmt.Errorf("fleet: publish %s request: %w", m.Type, err)
	}
	select {
	case reply := <-ch:
		if reply.Type == MsgError {
			detail := strings.TrimPrefix(reply.Error, fmt.Sprintf("fleet: refused device %q: %s: ", r.deviceID, reply.Reason))
			return reply, &Refusal{DeviceID: r.deviceID, Reason: reply.Reason, Detail: "the CA service answered: " + detail}
		}
		return reply, nil
	case <-ctx.Done():
		return Message{}, ctx.Err()
	case <-time.After(r.timeout):
		return Message{}, fmt.Errorf("fleet: no %s answer on %s within %v: is `tpmagent fleet ca serve` running and "+
			"does the broker ACL let this device use its $fleet topics?", m.Type, ResponseTopic(r.deviceID), r.timeout)
	}
}

// Submit implements CertRequester.
func (r *MQTTRequester) Submit(ctx context.Context, b *tpmkeys.AttestationBundle) (*tpmkeys.Challenge, error) {
	reply, err := r.roundTrip(ctx, Message{Type: MsgAttest, Bundle: b})
	if err != nil {
		return nil, err
	}
	if reply.Type != MsgChallenge || reply.Challenge == nil {
		return nil, fmt.Errorf("fleet: the CA answered %q to attest, want challenge", reply.Type)
	}
	return reply.Challenge, nil
}

// Complete implements CertRequester.
func (r *MQTTRequester) Complete(ctx context.Context, a *tpmkeys.ActivationResponse) ([]byte, error) {
	reply, err := r.roundTrip(ctx, Message{Type: MsgActivate, Activation: a})
	if err != nil {
		return nil, err
	}
	if reply.Type != MsgCertificate || reply.CertificatePEM == "" {
		return nil, fmt.Errorf("fleet: the CA answered %q to activate, want certificate", reply.Type)
	}
	return []byte(reply.CertificatePEM), nil
}

// Close disconnects from the broker.
func (r *MQTTRequester) Close() { r.client.Disconnect(250) }
