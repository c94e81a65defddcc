package fleet

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/tpmagent/tpmagent/tpmkeys"
)

// Topics of the CA service. <id> is the device id; the broker's ACL lets device <id> write
// only its own request topic and read only its own response topic.
const (
	RequestTopicFilter = "$fleet/certificates/+/request"
	topicPrefix        = "$fleet/certificates/"
)

// RequestTopic returns "$fleet/certificates/<id>/request".
func RequestTopic(id string) string { return topicPrefix + id + "/request" }

// ResponseTopic returns "$fleet/certificates/<id>/response".
func ResponseTopic(id string) string { return topicPrefix + id + "/response" }

// Message types.
const (
	MsgAttest      = "attest"      // device → CA: Bundle
	MsgActivate    = "activate"    // device → CA: Activation
	MsgChallenge   = "challenge"   // CA → device: Challenge
	MsgCertificate = "certificate" // CA → device: CertificatePEM
	MsgError       = "error"       // CA → device: Reason, Error
)

// Message is one request or response on the service topics (JSON).
type Message struct {
	Type string `json:"type"`
	// Nonce correlates a response with its request (chosen by the device).
	Nonce          string                      `json:"nonce,omitempty"`
	Bundle         *tpmkeys.AttestationBundle  `json:"bundle,omitempty"`
	Activation     *tpmkeys.ActivationResponse `json:"activation,omitempty"`
	Challenge      *tpmkeys.Challenge          `json:"challenge,omitempty"`
	CertificatePEM string                      `json:"certificate_pem,omitempty"`
	Reason         string                      `json:"reason,omitempty"`
	Error          string                      `json:"error,omitempty"`
}

// Service is the fleet CA's request handling: verify a bundle and challenge it, check the
// activation and issue. It keeps at most one open challenge per device; a challenge is used
// once. Safe for concurrent use.
type Service struct {
	CA            *CA
	Manufacturers *x509.CertPool
	ChallengeTTL  time.Duration
	Logger        *slog.Logger
	// OnIssue, when set, is called after each issued certificate (inventory, metrics).
	OnIssue func(v *Verified, cert *x509.Certificate)
	// PinnedEK, when set, returns the EK fingerprint (Verified.EKFingerprint) a device id
	// was first enrolled with; a request for that id from another TPM is refused, so a
	// genuine TPM cannot take over another device's identity (e.g. at renewal).
	PinnedEK func(deviceID string) (ekFingerprint string, ok bool)

	mu      sync.Mutex
	pending map[string]pendingEntry
}

type pendingEntry struct {
	p *Pending
	v *Verified
}

func (s *Service) log() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.New(slog.DiscardHandler)
}

// Submit verifies a bundle and returns its challenge, replacing any open challenge of the
// device. topicID is the device id the request came from ("" when not known, e.g.
// in-process); a bundle for another id is refused.
func (s *Service) Submit(topicID string, b *tpmkeys.AttestationBundle) (*tpmkeys.Challenge, error) {
	if b != nil && topicID != "" && b.DeviceID != topicID {
		return nil, refuse(topicID, ReasonMalformed, "bundle for device %q sent on device %q's topic", b.DeviceID, topicID)
	}
	v, err := Verify(b, s.Manufacturers)
	if err != nil {
		return nil, err
	}
	if s.PinnedEK != nil {
		if pin, ok := s.PinnedEK(v.DeviceID); ok && pin != v.EKFingerprint {
			return nil, refuse(v.DeviceID, ReasonEKMismatch, "the device was enrolled with the TPM whose EK is sha256:%s, "+
				"this request comes from EK sha256:%s", pin, v.EKFingerprint)
		}
	}
	ch, p, err := NewChallenge(v, s.ChallengeTTL, s.CA.now())
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	if s.pending == nil {
		s.pending = make(map[string]pendingEntry)
	}
	s.pending[v.DeviceID] = pendingEntry{p: p, v: v}
	s.mu.Unlock()
	return ch, nil
}

// Complete checks an activation response against the device's open challenge and issues
// the certificate. The challenge is consumed whether the check passes or not.
func (s *Service) Complete(topicID string, r *tpmkeys.ActivationResponse) (*x509.Certificate, error) {
	if r == nil {
		return nil, refuse(topicID, ReasonActivation, "no activation response")
	}
	id := r.DeviceID
	if topicID != "" && id != topicID {
		return nil, refuse(topicID, ReasonActivation, "activation for device %q sent on device %q's topic", id, topicID)
	}
	s.mu.Lock()
	e, ok := s.pending[id]
	delete(s.pending, id)
	s.mu.Unlock()
	if !ok {
		return nil, refuse(id, ReasonActivation, "no open challenge (already answered, or never asked): attest again")
	}
	if err := e.p.Check(r, s.CA.now()); err != nil {
		return nil, err
	}
	cert, err := s.CA.Issue(e.v)
	if err != nil {
		return nil, err
	}
	if s.OnIssue != nil {
		s.OnIssue(e.v, cert)
	}
	s.log().Info("certificate issued", "device", id, "serial", cert.SerialNumber.Text(16),
		"not_after", cert.NotAfter.Format(time.RFC3339), "key_sha256", e.v.KeyFingerprint)
	return cert, nil
}

// Handle answers one request message from device topicID.
func (s *Service) Handle(topicID string, req []byte) Message {
	var m Message
	if err := json.Unmarshal(req, &m); err != nil {
		return Message{Type: MsgError, Reason: ReasonMalformed, Error: "request is not JSON: " + err.Error()}
	}
	reply := func(err error) Message {
		s.log().Warn("request refused", "device", topicID, "type", m.Type, "err", err)
		reason := ReasonOf(err)
		if reason == "" {
			reason = "internal"
		}
		return Message{Type: MsgError, Nonce: m.Nonce, Reason: reason, Error: err.Error()}
	}
	switch m.Type {
	case MsgAttest:
		ch, err := s.Submit(topicID, m.Bundle)
		if err != nil {
			return reply(err)
		}
		return Message{Type: MsgChallenge, Nonce: m.Nonce, Challenge: ch}
	case MsgActivate:
		cert, err := s.Complete(topicID, m.Activation)
		if err != nil {
			return reply(err)
		}
		pemChain := EncodeCertPEM(cert)
		return Message{Type: MsgCertificate, Nonce: m.Nonce, CertificatePEM: string(pemChain)}
	default:
		return reply(refuse(topicID, ReasonMalformed, "unknown message type %q (attest, activate)", m.Type))
	}
}

// ServeOptions says how the service reaches the broker.
type ServeOptions struct {
	// BrokerURL is mqtts://HOST:PORT (ssl://, tls:// accepted).
	BrokerURL string
	// TLS carries the service's client certificate (CN fleet-ca) and the broker's CA.
	TLS *tls.Config
	// ClientID defaults to "fleet-ca".
	ClientID string
	// Ready, when set, receives a value (without blocking: make it buffered) each time the
	// service has (re)subscribed to the request topics.
	Ready chan<- struct{}
}

// Serve subscribes to $fleet/certificates/+/request and answers on each device's response
// topic until ctx ends. Requests are handled one at a time, off paho's delivery goroutine.
func (s *Service) Serve(ctx context.Context, o ServeOptions) error {
	if o.ClientID == "" {
		o.ClientID = ServiceUser
	}
	reqs := make(chan mqtt.Message, 64)
	opts := mqtt.NewClientOptions().AddBroker(brokerURL(o.BrokerURL)).SetClientID(o.ClientID).
		SetTLSConfig(o.TLS).SetCleanSession(true).SetAutoReconnect(true).SetConnectRetry(true).
		SetMaxReconnectInterval(10 * time.Second).SetOrderMatters(false)
	subscribe := func(c mqtt.Client) {
		t := c.Subscribe(RequestTopicFilter, 1, func(_ mqtt.Client, msg mqtt.Message) {
			select {
			case reqs <- msg:
			case <-ctx.Done():
			}
		})
		if t.WaitTimeout(10*time.Second) && t.Error() == nil {
			if o.Ready != nil {
				select {
				case o.Ready <- struct{}{}:
				default:
				}
			}
		} else {
			s.log().Error("subscribe to requests failed", "topic", RequestTopicFilter, "err", t.Error())
		}
	}
	opts.SetOnConnectHandler(subscribe)
	c := mqtt.NewClient(opts)
	t := c.Connect()
	select {
	case <-t.Done():
		if err := t.Error(); err != nil {
			return fmt.Errorf("fleet: CA service: connect to %s: %w", o.BrokerURL, err)
		}
	case <-ctx.Done():
		c.Disconnect(0)
		return ctx.Err()
	}
	defer c.Disconnect(250)
	s.log().Info("fleet CA service listening", "broker", o.BrokerURL, "topic", RequestTopicFilter)
	for {
		select {
		case <-ctx.Done():
			return nil
		case msg := <-reqs:
			id, ok := deviceOfTopic(msg.Topic())
			if !ok {
				continue
			}
			out, _ := json.Marshal(s.Handle(id, msg.Payload()))
			pt := c.Publish(ResponseTopic(id), 1, false, out)
			if !pt.WaitTimeout(10*time.Second) || pt.Error() != nil {
				s.log().Warn("response not delivered", "device", id, "err", pt.Error())
			}
		}
	}
}

func deviceOfTopic(topic string) (string, bool) {
	rest, ok := strings.CutPrefix(topic, topicPrefix)
	if !ok {
		return "", false
	}
	id, ok := strings.CutSuffix(rest, "/request")
	if !ok || id == "" || strings.Contains(id, "/") {
		return "", false
	}
	return id, true
}

// brokerURL maps mqtts:// (the agent's spelling) to paho's ssl://.
func brokerURL(u string) string {
	for _, p := range []string{"mqtts://", "tls://"} {
		if rest, ok := strings.CutPrefix(u, p); ok {
			return "ssl://" + rest
		}
	}
	return u
}

// ErrRefused wraps a refusal received from a remote CA.
var ErrRefused = errors.New("fleet: the CA refused the request")
