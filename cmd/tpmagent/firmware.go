package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spf13/cobra"

	"github.com/tpmagent/tpmagent/agent/config"
	"github.com/tpmagent/tpmagent/agent/daemon"
	"github.com/tpmagent/tpmagent/agent/identity"
	"github.com/tpmagent/tpmagent/firmware"
	"github.com/tpmagent/tpmagent/tpmkeys"
	"github.com/tpmagent/tpmagent/transport"
)

// newFirmwareCmd is `tpmagent firmware`: the release side (keygen, sign, publish) and the
// device side (status) of signed firmware updates (docs/FIRMWARE.md).
func (a *app) newFirmwareCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "firmware",
		Short: "Signed firmware updates: release keys, manifests, publishing, device status",
		Long: `firmware holds the release side of over-the-air updates (keygen, sign,
publish) and the device side's view of them (status). The device side runs in
` + "`tpmagent run`" + ` when firmware.enabled is set. The formats, topics and the
device's state machine are specified in docs/FIRMWARE.md.`,
	}
	cmd.AddCommand(a.newFirmwareKeygenCmd(), a.newFirmwareSignCmd(), a.newFirmwarePublishCmd(), a.newFirmwareStatusCmd())
	return cmd
}

// parseAlg maps --alg values to firmware algorithms.
func parseAlg(s string) (firmware.Alg, error) {
	switch strings.ToLower(s) {
	case "ecdsa-p256", "ecdsa", "p256", string(firmware.AlgECDSAP256):
		return firmware.AlgECDSAP256, nil
	case "ed25519":
		return firmware.AlgEd25519, nil
	}
	return "", usagef("firmware keygen: --alg %q: use ecdsa-p256 or ed25519", s)
}

func (a *app) newFirmwareKeygenCmd() *cobra.Command {
	var out, alg string
	cmd := &cobra.Command{
		Use:   "keygen -o release.key [--alg ecdsa-p256|ed25519]",
		Short: "Create a release signing key (private key 0600, public key KEY.pub for firmware.trust)",
		Long: `keygen creates a release signing key: the private key as PKCS#8 PEM with mode
0600 (an existing file is never overwritten) and the public key next to it as
KEY.pub (PKIX PEM), the file devices list in firmware.trust. It prints the key
id that signatures carry.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				return usagef("firmware keygen: -o FILE is required")
			}
			al, err := parseAlg(alg)
			if err != nil {
				return err
			}
			key, err := firmware.GenerateReleaseKey(al)
			if err != nil {
				return err
			}
			if err := firmware.WriteKeyFiles(out, key); err != nil {
				return err
			}
			id, _ := firmware.KeyID(key.Public())
			fmt.Fprintf(a.stdout, "release key %s (%s): private %s (0600), public %s.pub\n", id, al, out, out)
			return nil
		},
	}
	cmd.Flags().StringVarP(&out, "output", "o", "", "private key file to create (the public key goes to FILE.pub)")
	cmd.Flags().StringVar(&alg, "alg", "ecdsa-p256", "key algorithm: ecdsa-p256 or ed25519")
	return cmd
}

func (a *app) newFirmwareSignCmd() *cobra.Command {
	var (
		keyFile, image, version, name, out string
		secVersion                         uint64
		hardware, sources                  []string
		chunkSize                          int
	)
	cmd := &cobra.Command{
		Use:   "sign --key K --image F --version V --security-version N --hardware HW... -o manifest.json",
		Short: "Hash an image, write its manifest and sign it (the job devices receive)",
		Long: `sign streams the image to compute its size and SHA-256, builds the manifest
(name, version, security_version, hardware, chunk_size, sources, created) and
writes the signed envelope to -o: that file is the job ` + "`firmware publish`" + ` sends.

--security-version is compared with each device's anti-rollback counter in TPM
NV: raise it only when older releases must become uninstallable (a device
advances its counter after committing the release). --source is "mqtt" (chunks
over the broker, the default) or an https:// URL serving the image with Range
requests; repeat it to list several, tried in order.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch {
			case keyFile == "" || image == "" || version == "" || out == "":
				return usagef("firmware sign: --key, --image, --version and -o are required")
			case !cmd.Flags().Changed("security-version"):
				return usagef("firmware sign: --security-version is required (the anti-rollback level of this release; 0 if none)")
			case len(hardware) == 0:
				return usagef("firmware sign: give at least one --hardware id this release runs on (devices match firmware.hardware)")
			}
			key, err := firmware.LoadPrivateKey(keyFile)
			if err != nil {
				return err
			}
			m, err := firmware.BuildManifest(image, name, version, secVersion, hardware, chunkSize, sources)
			if err != nil {
				return err
			}
			job, err := firmware.Sign(m, key)
			if err != nil {
				return err
			}
			if err := os.WriteFile(out, job, 0o644); err != nil {
				return fmt.Errorf("firmware sign: write %s: %w", out, err)
			}
			id, _ := firmware.KeyID(key.Public())
			fmt.Fprintf(a.stdout, "signed %s %s security_version %d: %d bytes, sha256 %s, hardware %s, sources %s, key %s -> %s\n",
				m.Name, m.Version, m.SecurityVersion, m.Size, m.SHA256, strings.Join(m.Hardware, ","), strings.Join(m.Sources, ","), id, out)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&keyFile, "key", "", "release private key (from firmware keygen)")
	f.StringVar(&image, "image", "", "firmware image file")
	f.StringVar(&version, "version", "", "release version, e.g. 1.4.2")
	f.Uint64Var(&secVersion, "security-version", 0, "anti-rollback level (devices refuse releases below their TPM counter)")
	f.StringVar(&name, "name", "tpmagent", "firmware name")
	f.StringArrayVar(&hardware, "hardware", nil, "hardware id this release runs on (repeatable)")
	f.IntVar(&chunkSize, "chunk-size", firmware.DefaultChunkSize, "chunk size in bytes (MQTT requests, resume granularity)")
	f.StringArrayVar(&sources, "source", nil, `image source: "mqtt" or an https:// URL (repeatable; default mqtt)`)
	f.StringVarP(&out, "output", "o", "", "signed manifest (job) file to write")
	return cmd
}

// readJob reads a signed envelope and returns it with its manifest, decoded without checking
// the signature (devices do that); the manifest fields are validated.
func readJob(path string) ([]byte, *firmware.Manifest, error) {
	job, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("firmware: read manifest: %w", err)
	}
	var env struct {
		Manifest string `json:"manifest"`
	}
	if err := json.Unmarshal(job, &env); err != nil {
		return nil, nil, fmt.Errorf("firmware: %s is not a signed manifest (from `tpmagent firmware sign`): %w", path, err)
	}
	raw, err := base64.StdEncoding.DecodeString(env.Manifest)
	if err != nil {
		return nil, nil, fmt.Errorf("firmware: %s: field \"manifest\" is not base64: %w", path, err)
	}
	var m firmware.Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, nil, fmt.Errorf("firmware: %s: manifest: %w", path, err)
	}
	if err := m.Validate(); err != nil {
		return nil, nil, fmt.Errorf("firmware: %s: %w", path, err)
	}
	return job, &m, nil
}

// checkImage makes sure the image file is the one the manifest describes.
func checkImage(path string, m *firmware.Manifest) (*os.File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("firmware: open image: %w", err)
	}
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("firmware: read image %s: %w", path, err)
	}
	if got := hex.EncodeToString(h.Sum(nil)); n != m.Size || got != m.SHA256 {
		f.Close()
		return nil, fmt.Errorf("firmware: image %s (%d bytes, sha256 %s) is not the one the manifest describes (%d bytes, sha256 %s): give the image that was signed",
			path, n, got, m.Size, m.SHA256)
	}
	return f, nil
}

func (a *app) newFirmwarePublishCmd() *cobra.Command {
	var (
		manifest, image, device, group string
		serveFor                       time.Duration
		until                          []string
		jsonOut                        bool
	)
	cmd := &cobra.Command{
		Use:   "publish --manifest M --image F --device ID|--group G [--serve-for D] [--until STATE...]",
		Short: "Publish a signed job (retained) and serve the image in chunks over MQTT",
		Long: `publish connects to the broker with the identity in the configuration
(broker.cert_file with the TPM key, or broker.key_file for a backend host
without a TPM), publishes the signed manifest retained on the job topic
(devices/ID/firmware or groups/G/firmware), and answers the devices' chunk
requests (firmware/NAME/VERSION/chunks/request) until interrupted, until
--serve-for has passed, or, with --device, until the device reports one of the
--until states for this release.

With --device it prints the device's status messages (docs/FIRMWARE.md §6) as
they arrive: one line each, or the JSON with --json.

Exit status: 0 when interrupted, when --serve-for ended without --until, or when
an --until state was reported; 1 when --serve-for ended first or on errors.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch {
			case manifest == "" || image == "":
				return usagef("firmware publish: --manifest and --image are required")
			case (device == "") == (group == ""):
				return usagef("firmware publish: give exactly one of --device ID or --group G")
			case len(until) > 0 && device == "":
				return usagef("firmware publish: --until needs --device (status messages are per device)")
			}
			for _, s := range until {
				if !slices.Contains(firmwareStates, s) {
					return usagef("firmware publish: --until %q: one of %s", s, strings.Join(firmwareStates, ", "))
				}
			}
			cfg, err := a.loadConfig(cmd)
			if err != nil {
				return err
			}
			return a.runFirmwarePublish(cmd.Context(), cfg, publishOptions{manifest, image, device, group, serveFor, until, jsonOut})
		},
	}
	f := cmd.Flags()
	f.StringVar(&manifest, "manifest", "", "signed manifest (from firmware sign)")
	f.StringVar(&image, "image", "", "the image the manifest describes")
	f.StringVar(&device, "device", "", "device id: publish on devices/ID/firmware")
	f.StringVar(&group, "group", "", "group: publish on groups/G/firmware")
	f.DurationVar(&serveFor, "serve-for", 0, "stop serving after this long (default: until interrupted)")
	f.StringSliceVar(&until, "until", nil, "with --device: stop when the device reports one of these states for this release (e.g. committed,rolled_back,rejected,failed)")
	f.BoolVar(&jsonOut, "json", false, "print status messages as JSON")
	return cmd
}

var firmwareStates = []string{firmware.StateIdle, firmware.StateDownloading, firmware.StateVerifying, firmware.StateInstalling,
	firmware.StateRestarting, firmware.StateHealthCheck, firmware.StateCommitted, firmware.StateRolledBack, firmware.StateRejected, firmware.StateFailed}

type publishOptions struct {
	manifest, image, device, group string
	serveFor                       time.Duration
	until                          []string
	jsonOut                        bool
}

func (a *app) runFirmwarePublish(ctx context.Context, cfg *config.Config, o publishOptions) error {
	log := a.logger(cfg)
	job, m, err := readJob(o.manifest)
	if err != nil {
		return err
	}
	if len(cfg.Firmware.Trust) > 0 {
		trust, err := firmware.LoadTrustStore(cfg.Firmware.Trust...)
		if err != nil {
			return err
		}
		if _, err := firmware.ParseAndVerify(job, trust); err != nil {
			return fmt.Errorf("firmware publish: %s does not verify against firmware.trust (devices would reject it): %w", o.manifest, err)
		}
	}
	img, err := checkImage(o.image, m)
	if err != nil {
		return err
	}
	defer img.Close()
	if err := cfg.RequireBroker(); err != nil {
		return err
	}
	id, err := identity.Open(ctx, cfg, true, log)
	if err != nil {
		return fmt.Errorf("firmware publish: %w", err)
	}
	defer id.Close()
	tlsID, err := transport.NewTLSConfig(transport.TLSOptions{
		Signer: id.Signer, CertFile: cfg.Broker.CertFile, CAFile: cfg.Broker.CAFile,
		ServerName: cfg.Broker.ServerName, MinTLS: cfg.Broker.MinTLS, Logger: log,
	})
	if err != nil {
		return fmt.Errorf("firmware publish: %w", err)
	}
	client, err := transport.NewClient(transport.ClientOptions{
		URLs: cfg.Broker.URLs, TLS: tlsID.Config(), AllowPlaintext: cfg.Broker.AllowPlaintext,
		ClientID:     fmt.Sprintf("tpmagent-firmware-publish-%d", os.Getpid()),
		StatusTopic:  "-",
		CleanSession: true,
		Logger:       log,
		ExplainError: tlsID.ExplainTLSError,
	})
	if err != nil {
		return fmt.Errorf("firmware publish: %w", err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	if err := client.Start(runCtx); err != nil {
		return fmt.Errorf("firmware publish: %w", err)
	}
	defer func() {
		cctx, ccancel := context.WithTimeout(context.Background(), 3*time.Second)
		client.Close(cctx)
		ccancel()
	}()
	wctx, wcancel := context.WithTimeout(runCtx, 30*time.Second)
	err = client.WaitConnected(wctx)
	wcancel()
	if err != nil {
		return fmt.Errorf("firmware publish: no broker connection within 30s (broker.urls %s): %w", strings.Join(cfg.Broker.URLs, ","), err)
	}

	// Serve chunks.
	srv := &firmware.ChunkServer{Image: img, Size: m.Size, ChunkSize: m.ChunkSize}
	var chunks, served atomic.Int64
	reqTopic := firmware.ChunkRequestTopic(m.Name, m.Version)
	if err := client.Subscribe(runCtx, reqTopic, 1, func(msg transport.Message) {
		dev, resp, err := srv.Handle(msg.Payload)
		if err != nil {
			log.Warn("firmware publish: bad chunk request", "topic", msg.Topic, "err", err)
			return
		}
		if r, derr := firmware.DecodeChunkResponse(resp); derr == nil && r.Err == "" {
			chunks.Add(1)
			served.Add(int64(len(r.Data)))
		}
		if err := client.Publish(runCtx, firmware.ChunkResponseTopic(m.Name, m.Version, dev), 1, false, resp, nil); err != nil && runCtx.Err() == nil {
			log.Warn("firmware publish: chunk response not sent", "device", dev, "err", err)
		}
	}); err != nil {
		return fmt.Errorf("firmware publish: %w", err)
	}

	// Watch the device's status.
	reached := make(chan firmware.Status, 1)
	var outMu sync.Mutex
	if o.device != "" {
		if err := client.Subscribe(runCtx, firmware.StatusTopic(o.device), 1, func(msg transport.Message) {
			var s firmware.Status
			if err := json.Unmarshal(msg.Payload, &s); err != nil {
				log.Warn("firmware publish: unreadable status message", "topic", msg.Topic, "err", err)
				return
			}
			outMu.Lock()
			a.printStatus(o.device, s, msg.Payload, msg.Retained, o.jsonOut)
			outMu.Unlock()
			if !msg.Retained && s.Version == m.Version && slices.Contains(o.until, s.State) {
				select {
				case reached <- s:
				default:
				}
			}
		}); err != nil {
			return fmt.Errorf("firmware publish: %w", err)
		}
	}

	topic := firmware.GroupJobTopic(o.group)
	if o.device != "" {
		topic = firmware.JobTopic(o.device)
	}
	done := make(chan error, 1)
	if err := client.Publish(runCtx, topic, 1, true, job, func(err error) { done <- err }); err != nil {
		return fmt.Errorf("firmware publish: job on %s: %w", topic, err)
	}
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("firmware publish: job on %s: %w", topic, err)
		}
	case <-time.After(30 * time.Second):
		return fmt.Errorf("firmware publish: job on %s: no acknowledgement from the broker within 30s", topic)
	}
	outMu.Lock()
	fmt.Fprintf(a.stderr, "published %s %s (security_version %d, %d bytes) retained on %s; serving chunks on %s\n",
		m.Name, m.Version, m.SecurityVersion, m.Size, topic, reqTopic)
	outMu.Unlock()

	var timeout <-chan time.Time
	if o.serveFor > 0 {
		t := time.NewTimer(o.serveFor)
		defer t.Stop()
		timeout = t.C
	}
	var result error
	select {
	case <-ctx.Done():
	case s := <-reached:
		fmt.Fprintf(a.stderr, "device %s reported %s for %s %s\n", o.device, s.State, m.Name, m.Version)
	case <-timeout:
		if len(o.until) > 0 {
			result = fmt.Errorf("firmware publish: device %s did not report %s for %s %s within %s", o.device, strings.Join(o.until, " or "), m.Name, m.Version, o.serveFor)
		}
	}
	fmt.Fprintf(a.stderr, "served %d chunks, %d bytes\n", chunks.Load(), served.Load())
	return result
}

// printStatus prints one status message of device.
func (a *app) printStatus(device string, s firmware.Status, raw []byte, retained, jsonOut bool) {
	if jsonOut {
		fmt.Fprintf(a.stdout, "%s\n", bytes.TrimSpace(raw))
		return
	}
	fmt.Fprintln(a.stdout, formatStatus(device, s, retained))
}

func formatStatus(device string, s firmware.Status, retained bool) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s", device, s.State)
	if s.Name != "" {
		fmt.Fprintf(&b, " %s %s", s.Name, s.Version)
	}
	if s.SecurityVersion != 0 {
		fmt.Fprintf(&b, " security_version=%d", s.SecurityVersion)
	}
	if s.State == firmware.StateDownloading {
		fmt.Fprintf(&b, " %d%% (%d/%d bytes)", s.Percent, s.Bytes, s.Size)
	}
	if s.Reason != "" {
		fmt.Fprintf(&b, " reason=%s", s.Reason)
	}
	if s.Error != "" {
		fmt.Fprintf(&b, " error=%q", s.Error)
	}
	if retained {
		b.WriteString(" (retained, earlier)")
	}
	return b.String()
}

// deviceFirmwareStatus is what `firmware status` prints.
type deviceFirmwareStatus struct {
	Updater firmware.Status     `json:"updater"`
	Slots   *firmware.SlotState `json:"slots,omitempty"`
	Counter *uint64             `json:"anti_rollback_counter,omitempty"`
	Files   map[string]string   `json:"files"`
}

// readUpdaterStatus reads the updater's state file (updater.json in the firmware state
// directory, written by firmware.Updater): phase, release, reason, error, time.
func readUpdaterStatus(dir string) (firmware.Status, error) {
	path := filepath.Join(dir, "updater.json")
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return firmware.Status{State: firmware.StateIdle}, nil
	}
	if err != nil {
		return firmware.Status{}, fmt.Errorf("firmware status: %w", err)
	}
	var st struct {
		Phase           string    `json:"phase"`
		Name            string    `json:"name"`
		Version         string    `json:"version"`
		SecurityVersion uint64    `json:"security_version"`
		Reason          string    `json:"reason"`
		Error           string    `json:"error"`
		Time            time.Time `json:"time"`
	}
	if err := json.Unmarshal(data, &st); err != nil {
		return firmware.Status{}, fmt.Errorf("firmware status: %s: %w", path, err)
	}
	return firmware.Status{State: st.Phase, Name: st.Name, Version: st.Version, SecurityVersion: st.SecurityVersion,
		Reason: st.Reason, Error: st.Error, Time: st.Time}, nil
}

func (a *app) newFirmwareStatusCmd() *cobra.Command {
	var jsonOut, counter bool
	cmd := &cobra.Command{
		Use:   "status [--json] [--counter]",
		Short: "Device side: the updater's last job, the A/B slots and (with --counter) the TPM anti-rollback counter",
		Long: `status reads the firmware updater's state on this device: the last job and
its phase (docs/FIRMWARE.md §6) from <state_dir>/firmware, and for the file
installer the slot state (active, previous, pending, boot attempts, versions)
from slots.json next to firmware.slots.a.

--counter also opens the TPM (tpm.device) and reads the anti-rollback NV counter
at tpm.nv_counter_index. A swtpm serves one connection at a time: stop the agent
first there; /dev/tpmrm0 is shared.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := a.loadConfig(cmd)
			if err != nil {
				return err
			}
			out := deviceFirmwareStatus{Files: map[string]string{"state_dir": daemon.FirmwareStateDir(cfg)}}
			if out.Updater, err = readUpdaterStatus(daemon.FirmwareStateDir(cfg)); err != nil {
				return err
			}
			if cfg.Firmware.Installer != "command" {
				st, err := daemon.FileSlots(cfg).State()
				if err != nil {
					return err
				}
				out.Slots = &st
				out.Files["slot_state"] = daemon.SlotStatePath(cfg)
			}
			if counter {
				v, err := readNVCounter(cmd.Context(), cfg)
				if err != nil {
					return err
				}
				out.Counter = &v
			}
			if jsonOut {
				enc := json.NewEncoder(a.stdout)
				return enc.Encode(out)
			}
			u := out.Updater
			line := "updater: " + u.State
			if u.Name != "" {
				line += fmt.Sprintf(" %s %s security_version=%d", u.Name, u.Version, u.SecurityVersion)
			}
			if u.Reason != "" {
				line += " reason=" + u.Reason
			}
			if !u.Time.IsZero() {
				line += " at " + u.Time.Format(time.RFC3339)
			}
			fmt.Fprintln(a.stdout, line)
			if u.Error != "" {
				fmt.Fprintln(a.stdout, "error: "+u.Error)
			}
			if s := out.Slots; s != nil {
				fmt.Fprintf(a.stdout, "slots: active=%s version=%s previous=%s previous_version=%s pending=%s boot_attempts=%d\n",
					s.Active, orNone(s.Version), orNone(s.Previous), orNone(s.PreviousVersion), orNone(s.Pending), s.BootAttempts)
			}
			if out.Counter != nil {
				fmt.Fprintf(a.stdout, "anti-rollback counter (TPM NV %s): %d\n", cfg.TPM.NVCounterIndex, *out.Counter)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&jsonOut, "json", false, "print JSON")
	cmd.Flags().BoolVar(&counter, "counter", false, "also read the anti-rollback counter from the TPM")
	return cmd
}

func orNone(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// readNVCounter opens the TPM and reads the anti-rollback counter (defining it if absent).
func readNVCounter(ctx context.Context, cfg *config.Config) (uint64, error) {
	tp, err := tpmkeys.Open(ctx, cfg.TPM.Device)
	if err != nil {
		return 0, fmt.Errorf("firmware status: tpm.device %s: %w", cfg.TPM.Device, err)
	}
	defer tp.Close()
	c, err := tp.NVCounter(ctx, uint32(cfg.TPM.NVCounterIndex))
	if err != nil {
		return 0, fmt.Errorf("firmware status: %w", err)
	}
	return c.Read(ctx)
}
