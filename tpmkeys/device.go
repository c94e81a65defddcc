package tpmkeys

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
	"github.com/google/go-tpm/tpm2/transport/tcp"
)

// DeviceKind says how a TPM is reached.
type DeviceKind int

// Device kinds returned by ParseDevice.
const (
	// DeviceLinux is a Linux character device: /dev/tpmrmN (kernel resource manager) or /dev/tpmN.
	DeviceLinux DeviceKind = iota + 1
	// DeviceSwtpm is swtpm (or the MS reference simulator) over TCP.
	DeviceSwtpm
	// DeviceSimulator is go-tpm-tools' in-process simulator, available in tests only.
	DeviceSimulator
)

// Device is a parsed `tpm.device` value.
type Device struct {
	Kind DeviceKind
	// Path is the character device for DeviceLinux.
	Path string
	// CommandAddr and PlatformAddr are HOST:PORT for DeviceSwtpm.
	CommandAddr, PlatformAddr string
}

// AcceptedDeviceForms lists the forms of `tpm.device`, for error messages and help texts.
const AcceptedDeviceForms = `/dev/tpmrm0, /dev/tpm0 (or another /dev/tpmrmN, /dev/tpmN), ` +
	`swtpm://HOST:PORT[?platform=PORT] (platform port defaults to PORT+1), simulator (tests only)`

var linuxDeviceRE = regexp.MustCompile(`^/dev/tpm(rm)?[0-9]+$`)

// ParseDevice checks a `tpm.device` value without opening it. The error names the value and
// the accepted forms; configuration loading uses it to reject bad values early.
func ParseDevice(device string) (Device, error) {
	bad := func(why string) (Device, error) {
		return Device{}, fmt.Errorf("tpmkeys: tpm device %q: %s; accepted forms: %s", device, why, AcceptedDeviceForms)
	}
	switch {
	case device == "":
		return bad("empty")
	case device == "simulator":
		return Device{Kind: DeviceSimulator}, nil
	case linuxDeviceRE.MatchString(device):
		return Device{Kind: DeviceLinux, Path: device}, nil
	case strings.HasPrefix(device, "swtpm://"):
		u, err := url.Parse(device)
		if err != nil {
			return bad(err.Error())
		}
		if u.Path != "" && u.Path != "/" || u.User != nil || u.Fragment != "" {
			return bad("only HOST:PORT and ?platform=PORT are allowed after swtpm://")
		}
		host, port := u.Hostname(), u.Port()
		if host == "" || port == "" {
			return bad("swtpm:// needs HOST:PORT")
		}
		p, err := strconv.Atoi(port)
		if err != nil || p < 1 || p > 65534 {
			return bad(fmt.Sprintf("command port %q is not a number in 1..65534", port))
		}
		plat := p + 1
		q := u.Query()
		for k := range q {
			if k != "platform" {
				return bad(fmt.Sprintf("unknown parameter %q", k))
			}
		}
		if ps := q.Get("platform"); ps != "" {
			plat, err = strconv.Atoi(ps)
			if err != nil || plat < 1 || plat > 65535 {
				return bad(fmt.Sprintf("platform port %q is not a number in 1..65535", ps))
			}
		}
		return Device{
			Kind:         DeviceSwtpm,
			CommandAddr:  net.JoinHostPort(host, strconv.Itoa(p)),
			PlatformAddr: net.JoinHostPort(host, strconv.Itoa(plat)),
		}, nil
	default:
		return bad("unknown form")
	}
}

func portOf(hostport string) string {
	_, p, _ := net.SplitHostPort(hostport)
	return p
}

// openLinux opens a TPM character device with an error that says what to do.
func openLinux(path string) (transport.TPMCloser, error) {
	t, err := linuxtpm.Open(path)
	switch {
	case err == nil:
		return t, nil
	case errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("tpmkeys: open %s: no such device: check that the TPM is enabled in firmware "+
			"and its driver is loaded (ls /dev/tpm*), or set tpm.device (%s): %w", path, AcceptedDeviceForms, err)
	case errors.Is(err, fs.ErrPermission):
		return nil, fmt.Errorf("tpmkeys: open %s: permission denied: run as root or add the user to group tss "+
			"(usermod -aG tss USER) and check the permissions of %s: %w", path, path, err)
	case errors.Is(err, syscall.EBUSY):
		return nil, fmt.Errorf("tpmkeys: open %s: busy: another process holds it (%s allows one user); "+
			"use /dev/tpmrm0, the kernel's resource manager, or stop the other user (tpm2-abrmd?): %w", path, path, err)
	default:
		if fi, serr := os.Stat(path); serr == nil && fi.Mode()&os.ModeDevice == 0 {
			return nil, fmt.Errorf("tpmkeys: open %s: not a character device: %w", path, err)
		}
		return nil, fmt.Errorf("tpmkeys: open %s: %w; check /dev/tpmrm0 permissions (group tss)", path, err)
	}
}

// swtpmTransport is go-tpm's TCP transport that reconnects after a transport error, so a
// restarted swtpm (a "rebooted" TPM) is reached again on the next command. The failed command
// itself is not re-sent: callers decide whether repeating it is safe.
type swtpmTransport struct {
	cmdAddr, platAddr string
	conn              *tcp.TPM
}

func (s *swtpmTransport) connect() error {
	c, err := tcp.Open(tcp.Config{CommandAddress: s.cmdAddr, PlatformAddress: s.platAddr})
	if err != nil {
		return err
	}
	s.conn = c
	return nil
}

// Send implements transport.TPM.
func (s *swtpmTransport) Send(cmd []byte) ([]byte, error) {
	if s.conn == nil {
		if err := s.connect(); err != nil {
			return nil, fmt.Errorf("reconnect to swtpm at %s: %w; start swtpm", s.cmdAddr, err)
		}
	}
	rsp, err := s.conn.Send(cmd)
	if err != nil && (errors.Is(err, tcp.ErrTransport) || errors.Is(err, tcp.ErrTPMFailed) ||
		errors.Is(err, tcp.ErrEmptyResponse)) {
		_ = s.conn.Close()
		s.conn = nil
		return nil, fmt.Errorf("swtpm at %s: %w", s.cmdAddr, err)
	}
	return rsp, err
}

// Close implements io.Closer.
func (s *swtpmTransport) Close() error {
	if s.conn == nil {
		return nil
	}
	err := s.conn.Close()
	s.conn = nil
	return err
}
