// Package config loads and checks the agent's configuration: a YAML file,
// TPMAGENT_ environment variables (nesting with "_", e.g.
// TPMAGENT_TPM_KEY_HANDLE) and command-line flags, in rising priority.
//
// Unknown keys and malformed values are errors that name the field and say
// what a valid value looks like, so a typo never silently falls back to a
// default.
package config

import (
	"errors"
	"fmt"
	"os"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"
)

// DefaultFile is the configuration file read when --config is not given.
const DefaultFile = "/etc/tpmagent/agent.yaml"

// Config is the whole agent configuration. See configs/agent.yaml for an
// annotated example and docs for each field.
type Config struct {
	DeviceID  string    `mapstructure:"device_id"`
	StateDir  string    `mapstructure:"state_dir"`
	TPM       TPM       `mapstructure:"tpm"`
	Broker    Broker    `mapstructure:"broker"`
	Telemetry Telemetry `mapstructure:"telemetry"`
	Seal      Seal      `mapstructure:"seal"`
	Spool     Spool     `mapstructure:"spool"`
	Firmware  Firmware  `mapstructure:"firmware"`
	Enrol     Enrol     `mapstructure:"enrol"`
	Metrics   Metrics   `mapstructure:"metrics"`
	Status    Status    `mapstructure:"status"`
	Log       Log       `mapstructure:"log"`

	// File is the configuration file that was read ("" when none).
	File string `mapstructure:"-"`
}

// TPM selects the TPM and the key handles.
type TPM struct {
	// Device is /dev/tpmrm0, /dev/tpm0, swtpm://HOST:PORT[?platform=PORT] or
	// "simulator" (test builds only).
	Device    string `mapstructure:"device"`
	SRKHandle Handle `mapstructure:"srk_handle"`
	KeyHandle Handle `mapstructure:"key_handle"`
	// KeyType is ecc-p256 (default) or rsa-2048.
	KeyType string `mapstructure:"key_type"`
	// NVCounterIndex is the NV index of the firmware anti-rollback counter.
	NVCounterIndex Handle `mapstructure:"nv_counter_index"`
}

// Broker describes how to reach the MQTT brokers.
type Broker struct {
	URLs           []string      `mapstructure:"urls"`
	CAFile         string        `mapstructure:"ca_file"`
	CertFile       string        `mapstructure:"cert_file"`
	KeyFile        string        `mapstructure:"key_file"`
	ServerName     string        `mapstructure:"server_name"`
	MinTLS         string        `mapstructure:"min_tls"`
	Keepalive      time.Duration `mapstructure:"keepalive"`
	AllowPlaintext bool          `mapstructure:"allow_plaintext"`
	CleanSession   bool          `mapstructure:"clean_session"`
	BackoffBase    time.Duration `mapstructure:"backoff_base"`
	BackoffMax     time.Duration `mapstructure:"backoff_max"`
	KeyLog         string        `mapstructure:"keylog"`
}

// Telemetry configures ingestion, batching and publishing.
type Telemetry struct {
	Topic          string        `mapstructure:"topic"`
	QoS            int           `mapstructure:"qos"`
	BatchMax       int           `mapstructure:"batch_max"`
	BatchBytes     ByteSize      `mapstructure:"batch_bytes"`
	Linger         time.Duration `mapstructure:"linger"`
	Inflight       int           `mapstructure:"inflight"`
	Socket         string        `mapstructure:"socket"`
	SystemInterval time.Duration `mapstructure:"system_interval"`
	Encoding       string        `mapstructure:"encoding"`
}

// Seal configures sealed (end-to-end encrypted) telemetry.
type Seal struct {
	Enabled       bool          `mapstructure:"enabled"`
	CollectorKey  string        `mapstructure:"collector_key"`
	Suite         string        `mapstructure:"suite"`
	RekeyMessages uint64        `mapstructure:"rekey_messages"`
	RekeyAfter    time.Duration `mapstructure:"rekey_after"`
	// Collector side (tpmagent collect).
	CollectorPrivateKey string `mapstructure:"collector_private_key"`
	FleetCA             string `mapstructure:"fleet_ca"`
	Output              string `mapstructure:"output"`
	// StateDir holds the collector's durable state (replay windows and the
	// committed output length), which keeps the output exactly-once across
	// collector restarts; "" keeps it in memory only.
	StateDir string `mapstructure:"state_dir"`
	// MaxSessionAge: older sessions are rejected and forgotten (also by
	// the state).
	MaxSessionAge time.Duration `mapstructure:"max_session_age"`
}

// Spool configures the durable store-and-forward queue.
type Spool struct {
	Dir      string   `mapstructure:"dir"`
	MaxBytes ByteSize `mapstructure:"max_bytes"`
	// Fsync is always, batch or never.
	Fsync string `mapstructure:"fsync"`
	// OnFull is block or drop_oldest.
	OnFull string `mapstructure:"on_full"`
}

// Firmware configures over-the-air updates.
type Firmware struct {
	Enabled       bool          `mapstructure:"enabled"`
	Topic         string        `mapstructure:"topic"`
	Trust         []string      `mapstructure:"trust"`
	Hardware      string        `mapstructure:"hardware"`
	Installer     string        `mapstructure:"installer"`
	Command       string        `mapstructure:"command"`
	Slots         Slots         `mapstructure:"slots"`
	HealthTimeout time.Duration `mapstructure:"health_timeout"`
	RestartHook   string        `mapstructure:"restart_hook"`
}

// Slots are the A/B image files of the file installer.
type Slots struct {
	A string `mapstructure:"a"`
	B string `mapstructure:"b"`
}

// Enrol configures certificate renewal.
type Enrol struct {
	RenewHandle Handle `mapstructure:"renew_handle"`
}

// Metrics configures the Prometheus endpoint; empty Listen turns it off.
type Metrics struct {
	Listen string `mapstructure:"listen"`
}

// Status configures the local status socket.
type Status struct {
	Socket string `mapstructure:"socket"`
}

// Log configures logging.
type Log struct {
	Level  string `mapstructure:"level"`
	Format string `mapstructure:"format"`
}

// Handle is a TPM handle or NV index, written in hex ("0x81000100").
type Handle uint32

// String formats h as 0x%08x.
func (h Handle) String() string { return fmt.Sprintf("0x%08x", uint32(h)) }

// ByteSize is a size in bytes written as a number or with a unit
// (KiB, MiB, GiB, KB, MB, GB, B).
type ByteSize int64

// FieldError is a configuration error in one field.
type FieldError struct {
	Field string
	Value any
	Msg   string
	File  string
}

func (e *FieldError) Error() string {
	where := "config"
	if e.File != "" {
		where = "config " + e.File
	}
	if e.Value == nil {
		return fmt.Sprintf("%s: field %s: %s", where, e.Field, e.Msg)
	}
	return fmt.Sprintf("%s: field %s: %q %s", where, e.Field, fmt.Sprint(e.Value), e.Msg)
}

// IsConfigError reports whether err is a configuration (usage) error.
func IsConfigError(err error) bool {
	var fe *FieldError
	var ue *UsageError
	return errors.As(err, &fe) || errors.As(err, &ue)
}

// UsageError is a configuration error not tied to one field (a missing or
// unreadable file, a YAML syntax error).
type UsageError struct{ Err error }

func (e *UsageError) Error() string { return e.Err.Error() }
func (e *UsageError) Unwrap() error { return e.Err }

// Defaults sets every key's default on v (so that environment variables bind
// to every key).
func Defaults(v *viper.Viper) {
	d := map[string]any{
		"device_id":                  "",
		"state_dir":                  "/var/lib/tpmagent",
		"tpm.device":                 "/dev/tpmrm0",
		"tpm.srk_handle":             "0x81000002",
		"tpm.key_handle":             "0x81000100",
		"tpm.key_type":               "ecc-p256",
		"tpm.nv_counter_index":       "0x01500100",
		"broker.urls":                []string{},
		"broker.ca_file":             "/etc/tpmagent/ca.pem",
		"broker.cert_file":           "/var/lib/tpmagent/device.pem",
		"broker.key_file":            "",
		"broker.server_name":         "",
		"broker.min_tls":             "1.3",
		"broker.keepalive":           "30s",
		"broker.allow_plaintext":     false,
		"broker.clean_session":       false,
		"broker.backoff_base":        "1s",
		"broker.backoff_max":         "2m",
		"broker.keylog":              "",
		"telemetry.topic":            "devices/{device_id}/telemetry",
		"telemetry.qos":              1,
		"telemetry.batch_max":        64,
		"telemetry.batch_bytes":      "64KiB",
		"telemetry.linger":           "5ms",
		"telemetry.inflight":         1024,
		"telemetry.socket":           "/run/tpmagent/telemetry.sock",
		"telemetry.system_interval":  "10s",
		"telemetry.encoding":         "json",
		"seal.enabled":               false,
		"seal.collector_key":         "/etc/tpmagent/collector.key.pub",
		"seal.suite":                 "x25519-aes128gcm",
		"seal.rekey_messages":        1 << 20,
		"seal.rekey_after":           "1h",
		"seal.collector_private_key": "",
		"seal.fleet_ca":              "",
		"seal.output":                "-",
		"seal.state_dir":             "",
		"seal.max_session_age":       "720h",
		"spool.dir":                  "/var/lib/tpmagent/spool",
		"spool.max_bytes":            "256MiB",
		"spool.fsync":                "batch",
		"spool.on_full":              "block",
		"firmware.enabled":           false,
		"firmware.topic":             "devices/{device_id}/firmware",
		"firmware.trust":             []string{},
		"firmware.hardware":          "",
		"firmware.installer":         "file",
		"firmware.command":           "",
		"firmware.slots.a":           "/var/lib/tpmagent/slot-a",
		"firmware.slots.b":           "/var/lib/tpmagent/slot-b",
		"firmware.health_timeout":    "60s",
		"firmware.restart_hook":      "",
		"enrol.renew_handle":         "0x81000101",
		"metrics.listen":             "",
		"status.socket":              "/run/tpmagent/status.sock",
		"log.level":                  "info",
		"log.format":                 "text",
	}
	for k, val := range d {
		v.SetDefault(k, val)
	}
}

// Load reads the configuration. file is the --config value; explicit reports
// whether the user gave it (a missing explicit file is an error, a missing
// default file is not). flags, when non-nil, are bound by their names as
// config keys (e.g. a flag named "tpm.device").
func Load(file string, explicit bool, flags *pflag.FlagSet) (*Config, error) {
	v := viper.New()
	Defaults(v)
	v.SetEnvPrefix("TPMAGENT")
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "_"))
	v.AutomaticEnv()
	cfg := &Config{}
	if file != "" {
		if _, err := os.Stat(file); err == nil || explicit {
			v.SetConfigFile(file)
			v.SetConfigType("yaml")
			if err := v.ReadInConfig(); err != nil {
				return nil, &UsageError{fmt.Errorf("config %s: %w (check the path given with --config and the YAML syntax)", file, err)}
			}
			cfg.File = file
		}
	}
	if flags != nil {
		var bindErr error
		flags.VisitAll(func(f *pflag.Flag) {
			if strings.Contains(f.Name, ".") || f.Name == "device_id" {
				if err := v.BindPFlag(f.Name, f); err != nil && bindErr == nil {
					bindErr = err
				}
			}
		})
		if bindErr != nil {
			return nil, bindErr
		}
	}
	if err := decode(v, cfg); err != nil {
		if fe := (*FieldError)(nil); errors.As(err, &fe) {
			fe.File = cfg.File
		}
		return nil, err
	}
	if err := cfg.Validate(); err != nil {
		if fe := (*FieldError)(nil); errors.As(err, &fe) {
			fe.File = cfg.File
		}
		return nil, err
	}
	return cfg, nil
}

var unusedRe = regexp.MustCompile(`'([^']*)' has invalid keys: (.*)`)

var (
	handleType   = reflect.TypeOf(Handle(0))
	sizeType     = reflect.TypeOf(ByteSize(0))
	durationType = reflect.TypeOf(time.Duration(0))
)

func decode(v *viper.Viper, cfg *Config) error {
	known := map[string]reflect.Type{}
	collectKeys(reflect.TypeOf(Config{}), "", known)
	keys := v.AllKeys()
	sort.Strings(keys)
	for _, k := range keys {
		t, ok := known[k]
		if !ok {
			return &FieldError{Field: k, Msg: "is not a known configuration key (see configs/agent.yaml for the valid keys; check the spelling and nesting)"}
		}
		if err := checkValue(k, t, v.Get(k)); err != nil {
			return err
		}
	}
	hook := mapstructure.ComposeDecodeHookFunc(
		convertHook,
		mapstructure.StringToSliceHookFunc(","),
	)
	if err := v.UnmarshalExact(cfg, viper.DecodeHook(hook)); err != nil {
		if m := unusedRe.FindStringSubmatch(err.Error()); m != nil {
			return &FieldError{Field: m[1] + "." + m[2], Msg: "is not a known configuration key"}
		}
		return &UsageError{fmt.Errorf("config: %w", err)}
	}
	return nil
}

// checkValue parses a raw value for the field key of type t, so that a bad
// value is reported with the field's name.
func checkValue(key string, t reflect.Type, raw any) error {
	s, isString := raw.(string)
	switch {
	case t == handleType:
		if isString {
			if _, err := ParseHandle(s); err != nil {
				return &FieldError{Field: key, Value: s, Msg: err.Error()}
			}
		}
	case t == sizeType:
		if isString {
			if _, err := ParseByteSize(s); err != nil {
				return &FieldError{Field: key, Value: s, Msg: err.Error()}
			}
		}
	case t == durationType:
		if isString {
			if _, err := time.ParseDuration(s); err != nil {
				return &FieldError{Field: key, Value: s, Msg: "is not a duration (write it like 5ms, 30s or 2m)"}
			}
		}
	case t.Kind() == reflect.Int || t.Kind() == reflect.Uint64:
		if isString {
			if _, err := strconv.ParseInt(strings.TrimSpace(s), 0, 64); err != nil {
				return &FieldError{Field: key, Value: s, Msg: "is not a whole number"}
			}
		}
	case t.Kind() == reflect.Bool:
		if isString {
			if _, err := strconv.ParseBool(s); err != nil {
				return &FieldError{Field: key, Value: s, Msg: "is not true or false"}
			}
		}
	}
	return nil
}

func convertHook(from, to reflect.Type, data any) (any, error) {
	s, ok := data.(string)
	if !ok {
		return data, nil
	}
	switch to {
	case handleType:
		return ParseHandle(s)
	case sizeType:
		return ParseByteSize(s)
	case durationType:
		return time.ParseDuration(s)
	}
	return data, nil
}

func collectKeys(t reflect.Type, prefix string, out map[string]reflect.Type) {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag := f.Tag.Get("mapstructure")
		if tag == "-" || tag == "" {
			continue
		}
		key := tag
		if prefix != "" {
			key = prefix + "." + tag
		}
		if f.Type.Kind() == reflect.Struct {
			collectKeys(f.Type, key, out)
			continue
		}
		out[key] = f.Type
	}
}

// ParseHandle parses a TPM handle written as hex (0x81000100) or decimal.
func ParseHandle(s string) (Handle, error) {
	s = strings.TrimSpace(s)
	if !strings.HasPrefix(s, "0x") && !strings.HasPrefix(s, "0X") {
		return 0, fmt.Errorf("is not a hex handle (write it like 0x81000100)")
	}
	n, err := strconv.ParseUint(s[2:], 16, 32)
	if err != nil {
		return 0, fmt.Errorf("is not a hex handle (write it like 0x81000100)")
	}
	return Handle(n), nil
}

// ParseByteSize parses "256MiB", "64KiB", "1GB", "4096".
func ParseByteSize(s string) (ByteSize, error) {
	s = strings.TrimSpace(s)
	units := []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"KB", 1000}, {"MB", 1000 * 1000}, {"GB", 1000 * 1000 * 1000}, {"B", 1}}
	mult := int64(1)
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			mult = u.mult
			s = strings.TrimSpace(strings.TrimSuffix(s, u.suffix))
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("is not a size (write it like 256MiB, 64KiB or 4096)")
	}
	return ByteSize(n * mult), nil
}
