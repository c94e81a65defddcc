package source

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/tpmagent/tpmagent/agent/reading"
)

// System reads the host's vital signs every Interval
// (telemetry.system_interval): system.cpu.usage (%, since the previous
// sample), system.mem.used (%), system.mem.available (bytes), system.load1/5/15,
// system.uptime (s) and system.temp (°C, one per /sys/class/thermal zone,
// tagged zone=<type>) when present. Files it cannot read are skipped.
type System struct {
	// Interval between samples; 0 means 10 s.
	Interval time.Duration
	// Root is prefixed to /proc and /sys paths (tests); "" means /.
	Root string

	prevIdle, prevTotal uint64
}

// Name implements Source.
func (*System) Name() string { return "system" }

// Run implements Source.
func (s *System) Run(ctx context.Context, sink Sink) error {
	iv := s.Interval
	if iv <= 0 {
		iv = 10 * time.Second
	}
	t := time.NewTicker(iv)
	defer t.Stop()
	for {
		for _, r := range s.Sample(time.Now()) {
			if err := sink.Submit(ctx, r, nil); err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return fmt.Errorf("system source: %w", err)
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

func (s *System) path(p string) string { return filepath.Join(s.Root, p) }

// Sample returns the readings available now.
func (s *System) Sample(now time.Time) []reading.Reading {
	var out []reading.Reading
	add := func(name string, v float64, unit string, tags map[string]string) {
		out = append(out, reading.Reading{Name: name, Value: v, Unit: unit, Time: now, Tags: tags})
	}
	if b, err := os.ReadFile(s.path("/proc/stat")); err == nil {
		if line, _, ok := bytes.Cut(b, []byte("\n")); ok && bytes.HasPrefix(line, []byte("cpu ")) {
			var total, idle uint64
			for i, f := range strings.Fields(string(line))[1:] {
				v, _ := strconv.ParseUint(f, 10, 64)
				total += v
				if i == 3 || i == 4 { // idle, iowait
					idle += v
				}
			}
			if s.prevTotal != 0 && total > s.prevTotal {
				busy := 1 - float64(idle-s.prevIdle)/float64(total-s.prevTotal)
				add("system.cpu.usage", 100*busy, "%", nil)
			}
			s.prevIdle, s.prevTotal = idle, total
		}
	}
	if f, err := os.Open(s.path("/proc/meminfo")); err == nil {
		mem := map[string]float64{}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			k, v, ok := strings.Cut(sc.Text(), ":")
			if !ok {
				continue
			}
			fs := strings.Fields(v)
			if len(fs) > 0 {
				n, _ := strconv.ParseFloat(fs[0], 64)
				mem[k] = n * 1024
			}
		}
		f.Close()
		if tot, avail := mem["MemTotal"], mem["MemAvailable"]; tot > 0 {
			add("system.mem.used", 100*(tot-avail)/tot, "%", nil)
			add("system.mem.available", avail, "bytes", nil)
		}
	}
	if b, err := os.ReadFile(s.path("/proc/loadavg")); err == nil {
		fs := strings.Fields(string(b))
		for i, name := range []string{"system.load1", "system.load5", "system.load15"} {
			if i < len(fs) {
				if v, err := strconv.ParseFloat(fs[i], 64); err == nil {
					add(name, v, "", nil)
				}
			}
		}
	}
	if b, err := os.ReadFile(s.path("/proc/uptime")); err == nil {
		if fs := strings.Fields(string(b)); len(fs) > 0 {
			if v, err := strconv.ParseFloat(fs[0], 64); err == nil {
				add("system.uptime", v, "s", nil)
			}
		}
	}
	zones, _ := filepath.Glob(s.path("/sys/class/thermal/thermal_zone*"))
	for _, z := range zones {
		b, err := os.ReadFile(filepath.Join(z, "temp"))
		if err != nil {
			continue
		}
		milli, err := strconv.ParseFloat(strings.TrimSpace(string(b)), 64)
		if err != nil {
			continue
		}
		typ, _ := os.ReadFile(filepath.Join(z, "type"))
		zone := strings.TrimSpace(string(typ))
		if zone == "" {
			zone = filepath.Base(z)
		}
		add("system.temp", milli/1000, "C", map[string]string{"zone": zone})
	}
	return out
}
