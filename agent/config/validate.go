package config

import (
	"net"
	"net/url"
	"strconv"
	"strings"
)

// Validate checks values that must hold whatever the command; requirements
// of one command (a device id, a broker URL) are checked by Require*.
func (c *Config) Validate() error {
	if err := ValidateDevice(c.TPM.Device); err != nil {
		return &FieldError{Field: "tpm.device", Value: c.TPM.Device, Msg: err.Error()}
	}
	if c.TPM.SRKHandle>>24 != 0x81 {
		return &FieldError{Field: "tpm.srk_handle", Value: c.TPM.SRKHandle.String(), Msg: "is not a persistent handle (0x81000000-0x81ffffff)"}
	}
	if c.TPM.KeyHandle>>24 != 0x81 {
		return &FieldError{Field: "tpm.key_handle", Value: c.TPM.KeyHandle.String(), Msg: "is not a persistent handle (0x81000000-0x81ffffff)"}
	}
	if c.TPM.KeyHandle == c.TPM.SRKHandle {
		return &FieldError{Field: "tpm.key_handle", Value: c.TPM.KeyHandle.String(), Msg: "is the same as tpm.srk_handle: choose another persistent handle"}
	}
	if c.Enrol.RenewHandle>>24 != 0x81 {
		return &FieldError{Field: "enrol.renew_handle", Value: c.Enrol.RenewHandle.String(), Msg: "is not a persistent handle (0x81000000-0x81ffffff)"}
	}
	if c.TPM.NVCounterIndex>>24 != 0x01 {
		return &FieldError{Field: "tpm.nv_counter_index", Value: c.TPM.NVCounterIndex.String(), Msg: "is not an NV index (0x01000000-0x01ffffff)"}
	}
	checks := []struct {
		field, value string
		allowed      []string
	}{
		{"tpm.key_type", c.TPM.KeyType, []string{"ecc-p256", "rsa-2048"}},
		{"broker.min_tls", c.Broker.MinTLS, []string{"1.3", "1.2"}},
		{"telemetry.encoding", c.Telemetry.Encoding, []string{"json", "cbor"}},
		{"spool.fsync", c.Spool.Fsync, []string{"always", "batch", "never"}},
		{"spool.on_full", c.Spool.OnFull, []string{"block", "drop_oldest"}},
		{"firmware.installer", c.Firmware.Installer, []string{"file", "command"}},
		{"log.level", c.Log.Level, []string{"debug", "info", "warn", "error"}},
		{"log.format", c.Log.Format, []string{"text", "json"}},
	}
	for _, ch := range checks {
		if !contains(ch.allowed, ch.value) {
			return &FieldError{Field: ch.field, Value: ch.value, Msg: "is not one of " + strings.Join(ch.allowed, ", ")}
		}
	}
	if c.Telemetry.QoS != 0 && c.Telemetry.QoS != 1 {
		return &FieldError{Field: "telemetry.qos", Value: c.Telemetry.QoS, Msg: "must be 0 or 1"}
	}
	if c.Telemetry.BatchMax < 1 {
		return &FieldError{Field: "telemetry.batch_max", Value: c.Telemetry.BatchMax, Msg: "must be at least 1"}
	}
	if c.Telemetry.Inflight < 1 || c.Telemetry.Inflight > 65535 {
		return &FieldError{Field: "telemetry.inflight", Value: c.Telemetry.Inflight, Msg: "must be between 1 and 65535 (MQTT packet identifiers)"}
	}
	for i, u := range c.Broker.URLs {
		p, err := url.Parse(u)
		if err != nil || p.Host == "" {
			return &FieldError{Field: "broker.urls[" + strconv.Itoa(i) + "]", Value: u, Msg: "is not a broker URL (write it like mqtts://broker.example:8883)"}
		}
		switch p.Scheme {
		case "mqtts", "ssl", "tls":
		case "tcp", "mqtt":
			if !c.Broker.AllowPlaintext {
				return &FieldError{Field: "broker.urls[" + strconv.Itoa(i) + "]", Value: u, Msg: "is a plaintext URL: use mqtts:// or set broker.allow_plaintext: true (telemetry and credentials would cross the network unencrypted)"}
			}
		default:
			return &FieldError{Field: "broker.urls[" + strconv.Itoa(i) + "]", Value: u, Msg: "has an unknown scheme (use mqtts:// or ssl://)"}
		}
	}
	if c.Metrics.Listen != "" {
		if _, _, err := net.SplitHostPort(c.Metrics.Listen); err != nil {
			return &FieldError{Field: "metrics.listen", Value: c.Metrics.Listen, Msg: "is not HOST:PORT (e.g. 127.0.0.1:9108), or leave it empty to turn metrics off"}
		}
	}
	return nil
}

// ValidateDevice checks the form of a tpm.device value.
func ValidateDevice(dev string) error {
	switch {
	case dev == "simulator":
		return nil
	case strings.HasPrefix(dev, "/dev/tpm"):
		return nil
	case strings.HasPrefix(dev, "swtpm://"):
		u, err := url.Parse(dev)
		if err != nil || u.Hostname() == "" || u.Port() == "" {
			return errorString("is not swtpm://HOST:PORT (e.g. swtpm://127.0.0.1:2321)")
		}
		return nil
	}
	return errorString("is not a TPM device: use /dev/tpmrm0, /dev/tpm0, swtpm://HOST:PORT or simulator")
}

// RequireDeviceID fails when device_id is empty.
func (c *Config) RequireDeviceID() error {
	if c.DeviceID == "" {
		return &FieldError{Field: "device_id", File: c.File, Msg: "is empty: set device_id in the config file or TPMAGENT_DEVICE_ID"}
	}
	return nil
}

// RequireBroker fails when no broker URL, CA or certificate is configured.
func (c *Config) RequireBroker() error {
	if len(c.Broker.URLs) == 0 {
		return &FieldError{Field: "broker.urls", File: c.File, Msg: "is empty: list at least one broker, e.g. [mqtts://broker:8883]"}
	}
	return nil
}

// Expand replaces {device_id} in a topic template.
func (c *Config) Expand(topic string) string {
	return strings.ReplaceAll(topic, "{device_id}", c.DeviceID)
}

type errorString string

func (e errorString) Error() string { return string(e) }

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
