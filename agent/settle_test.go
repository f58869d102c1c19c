package main

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

// writeLink makes one link's files as /sys/class/net/<name> has them (carrier is unreadable on a
// link that is down: "" leaves it out). Each file is replaced whole (rename), as a reader of sysfs
// never sees one half-written.
func writeLink(t *testing.T, root, name, flags, carrier, operstate string) {
	t.Helper()
	if err := writeLinkFiles(root, name, flags, carrier, operstate); err != nil {
		t.Fatal(err)
	}
}

func writeLinkFiles(root, name, flags, carrier, operstate string) error {
	dir := filepath.Join(root, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	files := map[string]string{"flags": flags + "\n", "operstate": operstate + "\n"}
	if carrier != "" {
		files["carrier"] = carrier + "\n"
	}
	for f, v := range files {
		tmp := filepath.Join(dir, "."+f)
		if err := os.WriteFile(tmp, []byte(v), 0o644); err != nil {
			return err
		}
		if err := os.Rename(tmp, filepath.Join(dir, f)); err != nil {
			return err
		}
	}
	return nil
}

func TestUnannouncedLinks(t *testing.T) {
	root := t.TempDir()
	writeLink(t, root, "lo", "0x9", "1", "unknown")   // loopback: never announced, never waited for
	writeLink(t, root, "eth0", "0x1003", "1", "down") // up, carrier, not yet announced
	writeLink(t, root, "eth1", "0x1003", "1", "up")   // announced
	writeLink(t, root, "eth2", "0x1002", "", "down")  // administratively down
	writeLink(t, root, "eth3", "0x1003", "0", "down") // up without a carrier: stays down
	if got := unannouncedLinks(root); !reflect.DeepEqual(got, []string{"eth0"}) {
		t.Fatalf("unannounced = %v, want [eth0]", got)
	}
	if got := unannouncedLinks(filepath.Join(root, "missing")); got != nil {
		t.Fatalf("no sysfs: %v", got)
	}
}

func TestSettleWaitsForTheAnnouncementAtMostMaxWait(t *testing.T) {
	root := t.TempDir()
	writeLink(t, root, "eth0", "0x1003", "1", "down")
	announced := make(chan error, 1)
	go func() {
		time.Sleep(150 * time.Millisecond)
		announced <- writeLinkFiles(root, "eth0", "0x1003", "1", "up") // the link watcher ran
	}()
	m := settle(root, 5*time.Second)
	if err := <-announced; err != nil {
		t.Fatal(err)
	}
	if w := m["waitedMs"].(int64); w < 140 || w > 2000 {
		t.Fatalf("waited %d ms for an announcement 150 ms away", w)
	}
	if _, ok := m["unannounced"]; ok {
		t.Fatalf("announced link reported: %v", m)
	}

	writeLink(t, root, "eth1", "0x1003", "1", "down") // never announced
	t0 := time.Now()
	m = settle(root, 200*time.Millisecond)
	if d := time.Since(t0); d < 200*time.Millisecond || d > 2*time.Second {
		t.Fatalf("settle with a link never announced took %v, want its 200 ms bound", d)
	}
	if !reflect.DeepEqual(m["unannounced"], []string{"eth1"}) {
		t.Fatalf("unannounced = %v, want [eth1]", m["unannounced"])
	}
}
