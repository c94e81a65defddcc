package source

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestSystemSample(t *testing.T) {
	root := t.TempDir()
	write := func(p, s string) {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("/proc/stat", "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2\n")
	write("/proc/meminfo", "MemTotal:       1000 kB\nMemFree:  100 kB\nMemAvailable:    250 kB\n")
	write("/proc/loadavg", "0.50 0.25 0.10 1/100 1234\n")
	write("/proc/uptime", "3600.50 100.00\n")
	write("/sys/class/thermal/thermal_zone0/temp", "45500\n")
	write("/sys/class/thermal/thermal_zone0/type", "cpu-thermal\n")
	s := &System{Root: root}
	got := map[string]float64{}
	for _, r := range s.Sample(time.Now()) {
		got[r.Name] = r.Value
		if r.Name == "system.temp" && r.Tags["zone"] != "cpu-thermal" {
			t.Errorf("temp zone tag %q", r.Tags["zone"])
		}
	}
	want := map[string]float64{"system.mem.used": 75, "system.mem.available": 250 * 1024, "system.load1": 0.5, "system.load5": 0.25,
		"system.load15": 0.1, "system.uptime": 3600.5, "system.temp": 45.5}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v", k, got[k], v)
		}
	}
	if _, ok := got["system.cpu.usage"]; ok {
		t.Error("cpu usage reported without a previous sample")
	}
	// Second sample: 100 more jiffies, 50 of them idle → 50 % busy.
	write("/proc/stat", "cpu  125 0 125 750 100 0 0 0 0 0\n")
	for _, r := range s.Sample(time.Now()) {
		if r.Name == "system.cpu.usage" {
			if r.Value != 50 {
				t.Fatalf("cpu usage %v, want 50", r.Value)
			}
			return
		}
	}
	t.Fatal("no cpu usage on the second sample")
}

func TestSystemSampleLiveHost(t *testing.T) {
	if rs := (&System{}).Sample(time.Now()); len(rs) < 5 {
		t.Fatalf("only %d readings from this host's /proc", len(rs))
	}
}
