package main

import (
	"os"
	"path/filepath"
	"testing"
)

func TestParseOOMKill(t *testing.T) {
	for in, want := range map[string]int{
		"low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\noom_group_kill 0\n": 2,  // cgroup v2 memory.events
		"oom_kill_disable 0\nunder_oom 0\noom_kill 17\n":              17, // v1 memory.oom_control
		"oom_kill 5":                        5,
		"oom_kill_disable 1\nunder_oom 0\n": -1,
		"":                                  -1,
	} {
		if got := parseOOMKill([]byte(in)); got != want {
			t.Errorf("parseOOMKill(%q) = %d, want %d", in, got, want)
		}
	}
}

// The counter opens its file once and reads it afresh each time; the first path that opens wins.
func TestOOMCounterRereads(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "memory.events")
	if err := os.WriteFile(f, []byte("oom 1\noom_kill 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	o := newOOMCounter(filepath.Join(dir, "absent"), f)
	if got := o.count(); got != 1 {
		t.Fatalf("count = %d, want 1", got)
	}
	if err := os.WriteFile(f, []byte("oom 4\noom_kill 12\n"), 0o644); err != nil { // same inode, truncated
		t.Fatal(err)
	}
	if got := o.count(); got != 12 {
		t.Fatalf("count after the file changed = %d, want 12", got)
	}
	if got := newOOMCounter(filepath.Join(dir, "absent")).count(); got != -1 {
		t.Fatalf("count without a readable file = %d, want -1", got)
	}
}
