package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The log port gets conmon's k8s-file records: full lines as F, lines over
// 16 KiB split into P records, and output without a final newline as P.
func TestLogWriterRecords(t *testing.T) {
	dir := t.TempDir()
	out, err := os.Create(filepath.Join(dir, "log"))
	if err != nil {
		t.Fatal(err)
	}
	lw := &logWriter{f: out}
	r, w, _ := os.Pipe()
	lw.pump(r, "stdout")
	long := strings.Repeat("x", maxLogLine+10)
	w.WriteString("a\n\nb" + "c\n" + long + "\n" + "tail")
	w.Close()
	lw.wg.Wait()
	out.Close()
	b, _ := os.ReadFile(filepath.Join(dir, "log"))
	lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	var got []string
	for _, l := range lines {
		f := strings.SplitN(l, " ", 4)
		if len(f) < 3 {
			t.Fatalf("malformed record %q", l)
		}
		if _, err := time.Parse(time.RFC3339Nano, f[0]); err != nil {
			t.Fatalf("timestamp %q: %v", f[0], err)
		}
		text := ""
		if len(f) == 4 {
			text = f[3]
		}
		if len(text) > 20 {
			text = text[:3] + "…" + string(rune('0'+len(text)%10))
		}
		got = append(got, f[1]+" "+f[2]+" "+text)
	}
	want := []string{"stdout F a", "stdout F ", "stdout F bc", "stdout P xxx…" + string(rune('0'+maxLogLine%10)), "stdout F xxxxxxxxxx", "stdout P tail"}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("records:\n got %q\nwant %q", got, want)
	}
}

func TestReadConfigTrimsPadding(t *testing.T) {
	p := filepath.Join(t.TempDir(), "cfg")
	data := append([]byte(`{"args":["echo","hi"],"env":{"A":"1"},"cwd":"/tmp","uid":1000,"gid":1000,"memoryBytes":33554432,"pids":32,"cpuMillis":500}`), make([]byte, 4000)...)
	os.WriteFile(p, data, 0o600)
	cfg, err := readConfig(p)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Args[1] != "hi" || cfg.Env["A"] != "1" || cfg.UID != 1000 || cfg.MemoryBytes != 32<<20 || cfg.Pids != 32 || cfg.CPUMillis != 500 {
		t.Fatalf("config %+v", cfg)
	}
	os.WriteFile(p, make([]byte, 4096), 0o600)
	if _, err := readConfig(p); err == nil {
		t.Fatal("an empty config disk must be refused")
	}
	os.WriteFile(p, []byte(`{"args":[]}`), 0o600)
	if _, err := readConfig(p); err == nil || !strings.Contains(err.Error(), "empty args") {
		t.Fatalf("empty args: %v", err)
	}
}
