// Command benchtool holds the reference clients of `make bench`:
//
//	benchtool paho-pub   a plain paho.mqtt.golang publisher written the way
//	                     paho's README suggests (tokens collected, at most
//	                     -window unacknowledged), the QoS1 reference.
//	benchtool count-sub  a subscriber that counts messages (and readings in
//	                     JSON-array payloads) until -n messages or -readings
//	                     readings arrived, or -idle passes without one.
//
// Both take the broker URL, CA, certificate and key of a software identity.
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: benchtool paho-pub|count-sub [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "paho-pub":
		err = pahoPub(os.Args[2:])
	case "count-sub":
		err = countSub(os.Args[2:])
	default:
		err = fmt.Errorf("unknown subcommand %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchtool:", err)
		os.Exit(1)
	}
}

type common struct {
	url, ca, cert, key, id, topic string
	qos                           int
}

func (c *common) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.url, "url", "", "broker URL (mqtts://127.0.0.1:PORT)")
	fs.StringVar(&c.ca, "ca", "", "CA file")
	fs.StringVar(&c.cert, "cert", "", "client certificate")
	fs.StringVar(&c.key, "key", "", "client key")
	fs.StringVar(&c.id, "id", "benchtool", "client id")
	fs.StringVar(&c.topic, "topic", "bench/ref", "topic")
	fs.IntVar(&c.qos, "qos", 1, "QoS")
}

func (c *common) client() (mqtt.Client, error) {
	caPEM, err := os.ReadFile(c.ca)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	cert, err := tls.LoadX509KeyPair(c.cert, c.key)
	if err != nil {
		return nil, err
	}
	o := mqtt.NewClientOptions().AddBroker(c.url).SetClientID(c.id).
		SetTLSConfig(&tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, ServerName: "localhost"}).
		SetCleanSession(true).SetAutoReconnect(false).SetOrderMatters(false).SetKeepAlive(30 * time.Second)
	cl := mqtt.NewClient(o)
	if t := cl.Connect(); !t.WaitTimeout(10*time.Second) || t.Error() != nil {
		return nil, fmt.Errorf("connect %s: %v", c.url, t.Error())
	}
	return cl, nil
}

func pahoPub(args []string) error {
	fs := flag.NewFlagSet("paho-pub", flag.ExitOnError)
	var c common
	c.flags(fs)
	n := fs.Int("n", 200000, "messages")
	size := fs.Int("size", 64, "payload bytes")
	window := fs.Int("window", 1000, "unacknowledged messages at most")
	_ = fs.Parse(args)
	cl, err := c.client()
	if err != nil {
		return err
	}
	payload := bytes.Repeat([]byte("x"), *size)
	start := time.Now()
	pending := make([]mqtt.Token, 0, *window)
	for i := 0; i < *n; i++ {
		pending = append(pending, cl.Publish(c.topic, byte(c.qos), false, payload))
		if len(pending) == *window {
			for _, t := range pending {
				if !t.WaitTimeout(30*time.Second) || t.Error() != nil {
					return fmt.Errorf("publish: %v", t.Error())
				}
			}
			pending = pending[:0]
		}
	}
	for _, t := range pending {
		if !t.WaitTimeout(30*time.Second) || t.Error() != nil {
			return fmt.Errorf("publish: %v", t.Error())
		}
	}
	el := time.Since(start)
	cl.Disconnect(250)
	fmt.Printf("{\"messages\":%d,\"seconds\":%.3f,\"msgs_per_s\":%.0f}\n", *n, el.Seconds(), float64(*n)/el.Seconds())
	return nil
}

var nameKey = []byte(`"name":`)

func countSub(args []string) error {
	fs := flag.NewFlagSet("count-sub", flag.ExitOnError)
	var c common
	c.flags(fs)
	n := fs.Int64("n", 0, "stop after this many messages (0: no limit)")
	readings := fs.Int64("readings", 0, "stop after this many readings (0: no limit)")
	idle := fs.Duration("idle", 5*time.Second, "stop after this long without a message")
	ready := fs.String("ready", "", "file to create once subscribed")
	_ = fs.Parse(args)
	cl, err := c.client()
	if err != nil {
		return err
	}
	var msgs, rds atomic.Int64
	var last atomic.Int64
	done := make(chan struct{})
	var closed atomic.Bool
	var first atomic.Int64
	t := cl.Subscribe(c.topic, byte(c.qos), func(_ mqtt.Client, m mqtt.Message) {
		now := time.Now().UnixNano()
		first.CompareAndSwap(0, now)
		last.Store(now)
		m1 := msgs.Add(1)
		p := m.Payload()
		// A JSON batch counts as many readings as it has "name" members:
		// cheap enough that the subscriber does not limit the publisher
		// it measures (a full json.Unmarshal per message did).
		r := int64(1)
		if len(p) > 0 && p[0] == '[' {
			if n := bytes.Count(p, nameKey); n > 0 {
				r = int64(n)
			}
		}
		r1 := rds.Add(r)
		if ((*n > 0 && m1 >= *n) || (*readings > 0 && r1 >= *readings)) && closed.CompareAndSwap(false, true) {
			close(done)
		}
	})
	if !t.WaitTimeout(10*time.Second) || t.Error() != nil {
		return fmt.Errorf("subscribe: %v", t.Error())
	}
	if *ready != "" {
		_ = os.WriteFile(*ready, nil, 0o644)
	}
	last.Store(time.Now().UnixNano())
	for {
		select {
		case <-done:
		case <-time.After(100 * time.Millisecond):
			if time.Since(time.Unix(0, last.Load())) < *idle {
				continue
			}
		}
		break
	}
	cl.Disconnect(100)
	span := float64(last.Load()-first.Load()) / 1e9
	fmt.Printf("{\"messages\":%d,\"readings\":%d,\"span_s\":%.3f}\n", msgs.Load(), rds.Load(), span)
	return nil
}
