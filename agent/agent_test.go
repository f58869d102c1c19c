package main

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestHello(t *testing.T) {
	_, cl := startAgent(t, "/")
	f := cl.mustOK(M{"type": "hello"})
	if f.Int("version") != 1 || f.Str("agent") != "berth-agent/"+Version || f.Int("pid") != os.Getpid() || f.Str("kernel") == "" {
		t.Fatalf("hello: %v", f)
	}
	if caps, _ := f["capabilities"].([]any); len(caps) == 0 {
		t.Fatalf("no capabilities: %v", f)
	}
	cl.mustOK(M{"type": "ping"})
}

func TestRunOutputAndExitCode(t *testing.T) {
	_, cl := startAgent(t, "/")
	id := cl.send(M{"type": "run", "args": []string{"/bin/sh", "-c", "echo a; echo b >&2; exit 3"}})
	r := cl.wait(id)
	if r.frames[0].Type() != "started" || r.frames[0].Int("pid") <= 0 {
		t.Fatalf("first event is not started: %v", r.frames[0])
	}
	if r.stdout != "a\n" || r.stderr != "b\n" {
		t.Fatalf("stdout %q stderr %q", r.stdout, r.stderr)
	}
	if r.exit.Int("code") != 3 || r.exit["signal"] != nil || r.exit["oomKilled"] != false {
		t.Fatalf("exit: %v", r.exit)
	}
}

func TestRunOrderingLargeOutput(t *testing.T) {
	_, cl := startAgent(t, "/")
	id := cl.send(M{"type": "run", "args": []string{"sh", "-c", "i=0; while [ $i -lt 20000 ]; do echo $i; echo e$i >&2; i=$((i+1)); done"}})
	r := cl.wait(id)
	var want, wantErr strings.Builder
	for i := 0; i < 20000; i++ {
		fmt.Fprintf(&want, "%d\n", i)
		fmt.Fprintf(&wantErr, "e%d\n", i)
	}
	if r.stdout != want.String() || r.stderr != wantErr.String() {
		t.Fatalf("output out of order or lost (stdout %d bytes, stderr %d bytes)", len(r.stdout), len(r.stderr))
	}
	if last := r.frames[len(r.frames)-1]; last.Type() != "exit" || last.Int("code") != 0 {
		t.Fatalf("last event: %v", last)
	}
}

func TestRunEnvCwd(t *testing.T) {
	_, cl := startAgent(t, "/")
	dir := t.TempDir()
	id := cl.send(M{"type": "run", "args": []string{"sh", "-c", `echo "$FOO|$PATH"; pwd`}, "env": M{"FOO": "bar baz"}, "cwd": dir})
	r := cl.wait(id)
	if want := "bar baz|" + defaultPath + "\n" + dir + "\n"; r.stdout != want {
		t.Fatalf("got %q want %q", r.stdout, want)
	}
}

func TestRunUID(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root")
	}
	_, cl := startAgent(t, "/")
	id := cl.send(M{"type": "run", "args": []string{"sh", "-c", "id -u; id -g"}, "uid": 65534, "gid": 65533})
	if r := cl.wait(id); r.stdout != "65534\n65533\n" {
		t.Fatalf("got %q", r.stdout)
	}
}

func TestRunErrors(t *testing.T) {
	_, cl := startAgent(t, "/")
	for _, tc := range []struct {
		req  M
		code string
	}{
		{M{"type": "run", "args": []string{}}, CodeInvalidArgument},
		{M{"type": "run", "args": []string{"no-such-command-xyz"}}, CodeNotFound},
		{M{"type": "run", "args": []string{"/bin/sh"}, "cwd": "/no/such/dir"}, CodeNotFound},
	} {
		if f := cl.do(tc.req); f.Type() != "error" || f.Str("code") != tc.code {
			t.Errorf("%v: got %v, want error %s", tc.req, f, tc.code)
		}
	}
}

func TestStdin(t *testing.T) {
	_, cl := startAgent(t, "/")
	id := cl.send(M{"type": "run", "args": []string{"cat"}, "stdin": true})
	if f := cl.next(id); f.Type() != "started" {
		t.Fatalf("got %v", f)
	}
	cl.mustOK(M{"type": "stdin", "proc": id, "data": []byte("hello ")})
	cl.mustOK(M{"type": "stdin", "proc": id, "data": []byte("world"), "eof": true})
	r := cl.wait(id)
	if r.stdout != "hello world" || r.exit.Int("code") != 0 {
		t.Fatalf("stdout %q exit %v", r.stdout, r.exit)
	}
	// Without stdin:true the process reads EOF and stdin frames are refused.
	id = cl.send(M{"type": "run", "args": []string{"sh", "-c", "cat; echo done"}})
	if r := cl.wait(id); r.stdout != "done\n" {
		t.Fatalf("got %q", r.stdout)
	}
	if f := cl.do(M{"type": "stdin", "proc": "nope", "data": []byte("x")}); f.Str("code") != CodeNotFound {
		t.Fatalf("got %v", f)
	}
}

func TestSignalAndList(t *testing.T) {
	_, cl := startAgent(t, "/")
	id := cl.send(M{"type": "run", "args": []string{"sleep", "100"}})
	started := cl.next(id)
	list := cl.mustOK(M{"type": "list"})
	procs, _ := list["processes"].([]any)
	found := false
	for _, p := range procs {
		pm := p.(map[string]any)
		if pm["id"] == id && int(pm["pid"].(float64)) == started.Int("pid") {
			found = true
		}
	}
	if !found {
		t.Fatalf("list does not show %s: %v", id, list)
	}
	if f := cl.do(M{"type": "signal", "proc": id, "sig": "SIGBOGUS"}); f.Str("code") != CodeInvalidArgument {
		t.Fatalf("got %v", f)
	}
	cl.mustOK(M{"type": "signal", "proc": id, "sig": "SIGTERM"})
	r := cl.wait(id)
	if r.exit.Str("signal") != "SIGTERM" || r.exit.Int("code") != 143 {
		t.Fatalf("exit: %v", r.exit)
	}
	if f := cl.mustOK(M{"type": "list"}); len(f["processes"].([]any)) != 0 {
		t.Fatalf("still listed: %v", f)
	}
	if f := cl.do(M{"type": "signal", "proc": id, "sig": "SIGTERM"}); f.Str("code") != CodeNotFound {
		t.Fatalf("got %v", f)
	}
}

func TestUnknownTypeAndMalformed(t *testing.T) {
	_, cl := startAgent(t, "/")
	if f := cl.do(M{"type": "frobnicate"}); f.Type() != "error" || f.Str("code") != CodeInvalidArgument {
		t.Fatalf("got %v", f)
	}
	cl.sendRaw([]byte(`{"id":"bad","type":`)) // not JSON: the error has an empty id
	if f := cl.next(""); f.Str("code") != CodeInvalidArgument {
		t.Fatalf("got %v", f)
	}
	cl.sendRaw([]byte(`{"id":"bad2","type":"run","args":"sh"}`)) // wrong field type
	if f := cl.next("bad2"); f.Str("code") != CodeInvalidArgument {
		t.Fatalf("got %v", f)
	}
	cl.mustOK(M{"type": "ping"}) // the connection survives both
}

func TestOversizedFrame(t *testing.T) {
	_, cl := startAgent(t, "/")
	var hdr [4]byte
	binary.BigEndian.PutUint32(hdr[:], MaxFrame+1)
	cl.conn.Write(hdr[:])
	f := cl.next("")
	if f.Type() != "error" || f.Str("code") != CodeInvalidArgument {
		t.Fatalf("got %v", f)
	}
	select {
	case <-cl.done: // the agent closed the connection
	case <-time.After(5 * time.Second):
		t.Fatal("connection not closed")
	}
}

func TestFileOps(t *testing.T) {
	root := t.TempDir()
	_, cl := startAgent(t, root)
	cl.mustOK(M{"type": "file.mkdir", "path": "/a/b/c", "parents": true})
	cl.mustOK(M{"type": "file.write", "path": "/a/b/f.txt", "data": []byte("hello "), "mode": 0o600})
	cl.mustOK(M{"type": "file.write", "path": "a/b/f.txt", "data": []byte("world"), "append": true})
	if b, _ := os.ReadFile(filepath.Join(root, "a/b/f.txt")); string(b) != "hello world" {
		t.Fatalf("on disk: %q", b)
	}
	read := func(req M) (string, []Frame) {
		fs := cl.collect(cl.send(req))
		var s string
		for _, f := range fs {
			if f.Type() == "data" {
				s += string(f.Data())
			}
		}
		return s, fs
	}
	if s, fs := read(M{"type": "file.read", "path": "/a/b/f.txt"}); s != "hello world" || fs[len(fs)-1].Type() != "eof" {
		t.Fatalf("read %q %v", s, fs)
	}
	if s, _ := read(M{"type": "file.read", "path": "/a/b/f.txt", "offset": 6, "length": 3}); s != "wor" {
		t.Fatalf("ranged read %q", s)
	}
	st := Frame(cl.mustOK(M{"type": "file.stat", "path": "/a/b/f.txt"})["stat"].(map[string]any))
	if st.Str("type") != "file" || st.Int("size") != 11 || st.Int("mode") != 0o600 || st.Str("name") != "f.txt" {
		t.Fatalf("stat: %v", st)
	}
	if st := Frame(cl.mustOK(M{"type": "file.stat", "path": "/"})["stat"].(map[string]any)); st.Str("type") != "dir" {
		t.Fatalf("stat /: %v", st)
	}
	fs := cl.collect(cl.send(M{"type": "file.list", "path": "/a/b"}))
	names := map[string]string{}
	for _, f := range fs {
		if f.Type() == "entries" {
			for _, e := range f["entries"].([]any) {
				em := e.(map[string]any)
				names[em["name"].(string)] = em["type"].(string)
			}
		}
	}
	if len(names) != 2 || names["c"] != "dir" || names["f.txt"] != "file" {
		t.Fatalf("list: %v", names)
	}
	cl.mustOK(M{"type": "file.rename", "path": "/a/b/f.txt", "to": "/a/g.txt"})
	if _, err := os.Stat(filepath.Join(root, "a/g.txt")); err != nil {
		t.Fatal(err)
	}
	if f := cl.do(M{"type": "file.stat", "path": "/a/b/f.txt"}); f.Str("code") != CodeNotFound {
		t.Fatalf("got %v", f)
	}
	if f := cl.do(M{"type": "file.mkdir", "path": "/a"}); f.Str("code") != CodeFailedPrecondition {
		t.Fatalf("mkdir existing: %v", f)
	}
	if f := cl.do(M{"type": "file.remove", "path": "/a"}); f.Str("code") != CodeFailedPrecondition {
		t.Fatalf("remove non-empty: %v", f)
	}
	if f := cl.do(M{"type": "file.read", "path": "/a"}); f.Str("code") != CodeFailedPrecondition {
		t.Fatalf("read dir: %v", f)
	}
	cl.mustOK(M{"type": "file.remove", "path": "/a/g.txt"})
	cl.mustOK(M{"type": "file.remove", "path": "/a", "recursive": true})
	if ents, _ := os.ReadDir(root); len(ents) != 0 {
		t.Fatalf("root not empty: %v", ents)
	}
	if f := cl.do(M{"type": "file.remove", "path": "/"}); f.Str("code") != CodeInvalidArgument {
		t.Fatalf("remove root: %v", f)
	}
}

// TestPathTraversal checks that nothing outside --root is ever read or
// written, with openat2 and with the component-by-component fallback.
func TestPathTraversal(t *testing.T) {
	for _, mode := range []string{"openat2", "walk"} {
		t.Run(mode, func(t *testing.T) {
			root := filepath.Join(t.TempDir(), "x", "y", "root")
			os.MkdirAll(filepath.Join(root, "sub"), 0o755)
			a, cl := startAgent(t, root)
			if mode == "walk" {
				a.root.noOpenat2.Store(true)
			}
			must(t, os.Symlink("/etc", filepath.Join(root, "evil")))
			must(t, os.Symlink("../../..", filepath.Join(root, "sub", "up")))
			must(t, os.Symlink("/etc/passwd", filepath.Join(root, "pw")))
			must(t, os.Symlink("../../../../../../../../etc/passwd", filepath.Join(root, "sub", "pw2")))
			hostPasswd, _ := os.ReadFile("/etc/passwd")

			readAll := func(p string) (string, Frame) {
				fs := cl.collect(cl.send(M{"type": "file.read", "path": p}))
				var s string
				for _, f := range fs {
					s += string(f.Data())
				}
				return s, fs[len(fs)-1]
			}
			escapes := []string{"../../etc/passwd", "/../etc/passwd", "sub/../../etc/passwd", "a/../../b/../../etc/passwd"}
			inside := []string{"/etc/passwd", "evil/passwd", "sub/up/etc/passwd", "sub/up/sub/up/../up/etc/passwd", "pw", "sub/pw2"}
			for _, p := range append(escapes, inside...) {
				s, last := readAll(p)
				if last.Type() != "error" || (s != "" && s == string(hostPasswd)) {
					t.Errorf("read %q: got %v (content %d bytes)", p, last, len(s))
				}
			}
			// Lexical ".." escapes are refused outright.
			for _, p := range escapes {
				if _, last := readAll(p); last.Str("code") != CodePermissionDenied {
					t.Errorf("escape %q: %v", p, last)
				}
			}
			// Symlinks resolve inside the root, like in a chroot.
			must(t, os.MkdirAll(filepath.Join(root, "etc"), 0o755))
			must(t, os.WriteFile(filepath.Join(root, "etc", "passwd"), []byte("inside"), 0o644))
			for _, p := range inside {
				if s, last := readAll(p); s != "inside" {
					t.Errorf("read %q: got %q %v, want the file inside the root", p, s, last)
				}
			}
			// Writes, mkdir and rename through an escaping symlink stay inside too.
			name := fmt.Sprintf("berth-agent-test-%d", os.Getpid())
			cl.mustOK(M{"type": "file.write", "path": "evil/" + name, "data": []byte("x")})
			cl.mustOK(M{"type": "file.mkdir", "path": "sub/up/etc/" + name + ".d"})
			cl.mustOK(M{"type": "file.rename", "path": "evil/" + name, "to": "sub/up/etc/" + name + ".d/moved"})
			for _, p := range []string{"/etc/" + name, "/etc/" + name + ".d"} {
				if _, err := os.Lstat(p); err == nil {
					os.RemoveAll(p)
					t.Fatalf("%s was created on the host", p)
				}
			}
			if _, err := os.Stat(filepath.Join(root, "etc", name+".d", "moved")); err != nil {
				t.Fatal(err)
			}
			// stat and remove act on the link itself, not its target.
			if st := Frame(cl.mustOK(M{"type": "file.stat", "path": "evil"})["stat"].(map[string]any)); st.Str("type") != "symlink" || st.Str("target") != "/etc" {
				t.Fatalf("stat evil: %v", st)
			}
			cl.mustOK(M{"type": "file.remove", "path": "evil"})
			if _, err := os.Stat("/etc/passwd"); err != nil {
				t.Fatal(err)
			}
			// A symlink loop fails cleanly.
			must(t, os.Symlink("loop", filepath.Join(root, "loop")))
			if _, last := readAll("loop"); last.Type() != "error" {
				t.Fatalf("loop: %v", last)
			}
		})
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestLargeReadStreams reads a 64 MiB sparse file: it must arrive as many
// frames of at most one chunk, each within the frame limit.
func TestLargeReadStreams(t *testing.T) {
	root := t.TempDir()
	f, err := os.Create(filepath.Join(root, "big"))
	must(t, err)
	must(t, f.Truncate(64<<20))
	f.WriteAt([]byte("end"), 64<<20-3)
	f.Close()
	_, cl := startAgent(t, root)
	id := cl.send(M{"type": "file.read", "path": "big"})
	var total, frames int
	var last []byte
	for {
		f := cl.next(id)
		if f.Type() == "eof" {
			if f.Int("size") != 64<<20 {
				t.Fatalf("eof: %v", f)
			}
			break
		}
		if f.Type() != "data" {
			t.Fatalf("got %v", f)
		}
		d := f.Data()
		if len(d) > ReadChunk || f.Int("offset") != total {
			t.Fatalf("chunk of %d bytes at offset %v (expected %d)", len(d), f["offset"], total)
		}
		total += len(d)
		frames++
		last = d
	}
	if total != 64<<20 || frames < 64<<20/ReadChunk || !strings.HasSuffix(string(last), "end") {
		t.Fatalf("total %d in %d frames", total, frames)
	}
}

func procStatus(t *testing.T, pid int, field string) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	must(t, err)
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, field+":") {
			n, _ := strconv.Atoi(strings.Fields(line)[1])
			return n
		}
	}
	t.Fatalf("%s not in /proc/%d/status", field, pid)
	return 0
}

// TestBinaryMemory runs the built agent: idle RSS after hello, and peak RSS
// while streaming a 64 MiB sparse file, both stay small.
func TestBinaryMemory(t *testing.T) {
	root := t.TempDir()
	f, err := os.Create(filepath.Join(root, "big"))
	must(t, err)
	must(t, f.Truncate(64<<20))
	f.Close()
	cmd, cl := startBinary(t, "--root", root)
	cl.mustOK(M{"type": "hello"})
	idle := procStatus(t, cmd.Process.Pid, "VmRSS")
	t.Logf("idle VmRSS after hello: %d KiB", idle)
	if idle > 8<<10 {
		t.Errorf("idle RSS %d KiB > 8 MiB", idle)
	}
	id := cl.send(M{"type": "file.read", "path": "big"})
	total := 0
	for {
		f := cl.next(id)
		if f.Type() != "data" {
			break
		}
		total += len(f.Data())
		if total == 8<<20 {
			time.Sleep(200 * time.Millisecond) // a slow reader must not make the agent buffer
		}
	}
	hwm := procStatus(t, cmd.Process.Pid, "VmHWM")
	t.Logf("read %d MiB; agent VmHWM %d KiB", total>>20, hwm)
	if total != 64<<20 || hwm > 32<<10 {
		t.Errorf("total %d, VmHWM %d KiB", total, hwm)
	}
}

// TestReaper runs the binary as a child subreaper (what PID 1 does): orphans
// are reaped and the exit status of started processes is never stolen.
func TestReaper(t *testing.T) {
	cmd, cl := startBinary(t, "--reaper")
	if f := cl.mustOK(M{"type": "hello"}); !strings.Contains(fmt.Sprint(f["capabilities"]), "reaper") {
		t.Fatalf("no reaper capability: %v", f)
	}
	// The background sleep is orphaned onto the agent when sh exits.
	id := cl.send(M{"type": "run", "args": []string{"sh", "-c", "sleep 0.2 >/dev/null 2>&1 & exit 5"}})
	if r := cl.wait(id); r.exit.Int("code") != 5 {
		t.Fatalf("exit: %v", r.exit)
	}
	var ids []string
	for i := 0; i < 50; i++ {
		ids = append(ids, cl.send(M{"type": "run", "args": []string{"sh", "-c", fmt.Sprintf("exit %d", i%7)}}))
	}
	for i, id := range ids {
		if r := cl.wait(id); r.exit.Int("code") != i%7 {
			t.Fatalf("process %d: exit %v", i, r.exit)
		}
	}
	time.Sleep(500 * time.Millisecond)
	if z := zombieChildren(cmd.Process.Pid); len(z) > 0 {
		t.Fatalf("unreaped children of the agent: %v", z)
	}
}

func zombieChildren(ppid int) []string {
	var out []string
	dirs, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, p := range dirs {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) > 2 && f[1] == strconv.Itoa(ppid) {
			out = append(out, p+" state "+f[0])
		}
	}
	return out
}

func TestBinaryShutdown(t *testing.T) {
	cmd, cl := startBinary(t)
	cl.mustOK(M{"type": "shutdown", "poweroff": false})
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("agent exited with %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("agent did not exit")
	}
}

func TestBinaryStdio(t *testing.T) {
	if agentBin == "" {
		t.Skip("agent binary not built")
	}
	cmd := exec.Command(agentBin, "--listen", "stdio")
	in, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	must(t, cmd.Start())
	defer cmd.Wait()
	in.Write(append([]byte{0, 0, 0, 27}, `{"id":"h1","type":"hello"}`+" "...))
	payload, err := readFrame(bufio.NewReader(out))
	must(t, err)
	if !strings.Contains(string(payload), `"version":1`) || !strings.Contains(string(payload), `"id":"h1"`) {
		t.Fatalf("got %s", payload)
	}
	in.Close() // EOF ends the agent
	if b, _ := io.ReadAll(out); len(b) != 0 {
		t.Fatalf("trailing output %q", b)
	}
}

// TestChroot runs a static busybox inside a temp --root: the process sees only the root.
func TestChroot(t *testing.T) {
	bb, err := exec.LookPath("busybox")
	if os.Getuid() != 0 || err != nil {
		t.Skip("needs root and a busybox binary")
	}
	if out, _ := exec.Command("file", "-L", bb).Output(); !strings.Contains(string(out), "statically linked") {
		t.Skip("busybox is not static")
	}
	root := t.TempDir()
	must(t, os.MkdirAll(filepath.Join(root, "bin"), 0o755))
	b, err := os.ReadFile(bb)
	must(t, err)
	must(t, os.WriteFile(filepath.Join(root, "bin", "busybox"), b, 0o755))
	must(t, os.Symlink("busybox", filepath.Join(root, "bin", "sh")))
	_, cl := startAgent(t, root)
	id := cl.send(M{"type": "run", "args": []string{"sh", "-c", "cd /; echo *; pwd"}, "cwd": "/bin"})
	if r := cl.wait(id); r.stdout != "bin\n/\n" {
		t.Fatalf("got %q %q", r.stdout, r.stderr)
	}
}
