package main

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// readUntil collects a process's stdout events until the text matches re.
func readUntil(t *testing.T, cl *client, id string, re *regexp.Regexp) string {
	t.Helper()
	var out strings.Builder
	deadline := time.After(10 * time.Second)
	ch := cl.sub(id)
	for {
		select {
		case f := <-ch:
			if f.Type() == "stdout" {
				out.Write(f.Data())
				if re.MatchString(out.String()) {
					return out.String()
				}
			} else if terminal(f.Type()) {
				t.Fatalf("ended before %v: %v (output %q)", re, f, out.String())
			}
		case <-deadline:
			t.Fatalf("no %v in %q", re, out.String())
		}
	}
}

func TestPty(t *testing.T) {
	if _, err := os.Stat("/dev/pts/ptmx"); err != nil {
		t.Skip("no devpts")
	}
	_, cl := startAgent(t, "/")
	id := cl.send(M{"type": "run", "args": []string{"/bin/sh"}, "tty": true, "cols": 100, "rows": 30, "env": M{"PS1": "$ "}})
	if f := cl.next(id); f.Type() != "started" {
		t.Fatalf("got %v", f)
	}
	cl.mustOK(M{"type": "stdin", "proc": id, "data": []byte("stty size; tty\n")})
	out := readUntil(t, cl, id, regexp.MustCompile(`/dev/pts/\d+`))
	if !strings.Contains(out, "30 100") {
		t.Fatalf("size not 30 100: %q", out)
	}
	cl.mustOK(M{"type": "resize", "proc": id, "cols": 132, "rows": 43})
	cl.mustOK(M{"type": "stdin", "proc": id, "data": []byte("stty size\n")})
	readUntil(t, cl, id, regexp.MustCompile(`43 132`))
	if f := cl.do(M{"type": "resize", "proc": id, "cols": 0, "rows": 1}); f.Str("code") != CodeInvalidArgument {
		t.Fatalf("got %v", f)
	}
	cl.mustOK(M{"type": "stdin", "proc": id, "data": []byte("exit 5\n")})
	r := cl.wait(id)
	if r.exit.Int("code") != 5 {
		t.Fatalf("exit %v", r.exit)
	}
	// resize of a process without a terminal
	id = cl.send(M{"type": "run", "args": []string{"sleep", "5"}})
	cl.next(id)
	if f := cl.do(M{"type": "resize", "proc": id, "cols": 10, "rows": 10}); f.Str("code") != CodeFailedPrecondition {
		t.Fatalf("got %v", f)
	}
	cl.mustOK(M{"type": "signal", "proc": id, "sig": "KILL"})
}

func TestWatch(t *testing.T) {
	_, cl := startAgent(t, "/")
	dir := t.TempDir()
	must(t, os.Mkdir(filepath.Join(dir, "sub"), 0o755))
	id := cl.send(M{"type": "watch", "path": dir, "recursive": true})
	if f := cl.next(id); f.Type() != "ready" {
		t.Fatalf("got %v", f)
	}
	must(t, os.WriteFile(filepath.Join(dir, "a"), []byte("x"), 0o644))
	must(t, os.WriteFile(filepath.Join(dir, "sub", "b"), []byte("y"), 0o644))
	must(t, os.Rename(filepath.Join(dir, "a"), filepath.Join(dir, "c")))
	must(t, os.Remove(filepath.Join(dir, "c")))
	must(t, os.Mkdir(filepath.Join(dir, "new"), 0o755))
	time.Sleep(50 * time.Millisecond) // the watch on the new directory is added when its event is read
	must(t, os.WriteFile(filepath.Join(dir, "new", "d"), nil, 0o644))
	want := []string{"create " + dir + "/a", "write " + dir + "/a", "create " + dir + "/sub/b", "write " + dir + "/sub/b",
		"rename " + dir + "/a>" + dir + "/c", "remove " + dir + "/c", "create " + dir + "/new", "create " + dir + "/new/d"}
	var got []string
	deadline := time.After(5 * time.Second)
	for len(got) < len(want) {
		select {
		case f := <-cl.sub(id):
			for _, e := range f["events"].([]any) {
				ev := Frame(e.(map[string]any))
				s := ev.Str("type") + " " + ev.Str("path")
				if ev.Str("to") != "" {
					s += ">" + ev.Str("to")
				}
				got = append(got, s)
			}
		case <-deadline:
			t.Fatalf("got %q, want %q", got, want)
		}
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("got %q\nwant %q", got, want)
	}
	if f := cl.do(M{"type": "cancel", "target": id}); f.Type() != "ok" {
		t.Fatalf("cancel: %v", f)
	}
	if f := cl.next(id); f.Type() != "eof" {
		t.Fatalf("after cancel: %v", f)
	}
	if f := cl.do(M{"type": "watch", "path": dir + "/nope"}); f.Str("code") != CodeNotFound {
		t.Fatalf("got %v", f)
	}
	if f := cl.do(M{"type": "cancel", "target": "nope"}); f.Str("code") != CodeNotFound {
		t.Fatalf("got %v", f)
	}
}
