package main

import (
	"bufio"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// Frame is a decoded agent frame.
type Frame map[string]any

func (f Frame) Type() string { s, _ := f["type"].(string); return s }
func (f Frame) Str(k string) string {
	s, _ := f[k].(string)
	return s
}
func (f Frame) Int(k string) int {
	n, _ := f[k].(float64)
	return int(n)
}
func (f Frame) Data() []byte {
	b, _ := base64.StdEncoding.DecodeString(f.Str("data"))
	return b
}

func terminal(t string) bool { return t == "ok" || t == "error" || t == "exit" || t == "eof" }

// client is a minimal protocol client: one reader goroutine routes frames by id.
type client struct {
	t    testing.TB
	conn net.Conn
	wmu  sync.Mutex
	mu   sync.Mutex
	subs map[string]chan Frame
	seq  int
	done chan struct{}
}

func dial(t testing.TB, sock string) *client {
	t.Helper()
	var c net.Conn
	var err error
	for i := 0; i < 100; i++ { // the agent binary may still be starting
		if c, err = net.Dial("unix", sock); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	cl := &client{t: t, conn: c, subs: map[string]chan Frame{}, done: make(chan struct{})}
	go cl.readLoop()
	t.Cleanup(func() { c.Close() })
	return cl
}

func (cl *client) readLoop() {
	defer close(cl.done)
	r := bufio.NewReader(cl.conn)
	for {
		payload, err := readFrame(r)
		if err != nil {
			return
		}
		var f Frame
		if err := json.Unmarshal(payload, &f); err != nil {
			cl.t.Errorf("bad frame from agent: %v", err)
			return
		}
		cl.sub(f.Str("id")) <- f
	}
}

func (cl *client) sub(id string) chan Frame {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	ch, ok := cl.subs[id]
	if !ok {
		ch = make(chan Frame, 1<<14)
		cl.subs[id] = ch
	}
	return ch
}

func (cl *client) newID() string {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	cl.seq++
	return fmt.Sprintf("r%d", cl.seq)
}

func (cl *client) sendRaw(payload []byte) {
	cl.wmu.Lock()
	defer cl.wmu.Unlock()
	var hdr [4]byte
	binary.BigEndian.PutUint32(hdr[:], uint32(len(payload)))
	if _, err := cl.conn.Write(append(hdr[:], payload...)); err != nil {
		cl.t.Fatalf("write: %v", err)
	}
}

// send sends a request (an id is added when missing) and returns its id.
func (cl *client) send(req M) string {
	if _, ok := req["id"]; !ok {
		req["id"] = cl.newID()
	}
	b, err := json.Marshal(req)
	if err != nil {
		cl.t.Fatal(err)
	}
	cl.sendRaw(b)
	return req["id"].(string)
}

// next returns the next frame for id.
func (cl *client) next(id string) Frame {
	cl.t.Helper()
	select {
	case f := <-cl.sub(id):
		return f
	case <-time.After(20 * time.Second):
		cl.t.Fatalf("timeout waiting for a frame for %q", id)
		return nil
	}
}

// collect returns every frame for id up to and including the terminal one.
func (cl *client) collect(id string) []Frame {
	cl.t.Helper()
	var out []Frame
	for {
		f := cl.next(id)
		out = append(out, f)
		if terminal(f.Type()) {
			return out
		}
	}
}

// do sends a single-response request and returns the response.
func (cl *client) do(req M) Frame {
	cl.t.Helper()
	fs := cl.collect(cl.send(req))
	return fs[len(fs)-1]
}

func (cl *client) mustOK(req M) Frame {
	cl.t.Helper()
	f := cl.do(req)
	if f.Type() != "ok" {
		cl.t.Fatalf("%v: got %v", req, f)
	}
	return f
}

// runResult is the collected events of one process.
type runResult struct {
	frames         []Frame
	stdout, stderr string
	exit           Frame
}

func (cl *client) wait(id string) runResult {
	cl.t.Helper()
	var r runResult
	r.frames = cl.collect(id)
	for _, f := range r.frames {
		switch f.Type() {
		case "stdout":
			r.stdout += string(f.Data())
		case "stderr":
			r.stderr += string(f.Data())
		case "exit":
			r.exit = f
		case "error":
			cl.t.Fatalf("run failed: %v", f)
		}
	}
	return r
}

// startAgent runs an in-process agent on a unix socket under a temp dir.
func startAgent(t *testing.T, root string) (*Agent, *client) {
	t.Helper()
	r, err := OpenRoot(root)
	if err != nil {
		t.Fatal(err)
	}
	a := NewAgent(r, false, false)
	a.exit = func(code int) { t.Errorf("agent tried to exit(%d)", code) }
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go a.ServeListener(l)
	return a, dial(t, sock)
}

var agentBin string // built by TestMain; empty when the build failed

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "berth-agent-test")
	if err != nil {
		panic(err)
	}
	bin := filepath.Join(dir, "berth-agent")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building the agent binary failed, binary tests will be skipped: %v\n%s", err, out)
	} else {
		agentBin = bin
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// startBinary runs the built agent as a separate process on a unix socket.
func startBinary(t *testing.T, args ...string) (*exec.Cmd, *client) {
	t.Helper()
	if agentBin == "" {
		t.Skip("agent binary not built")
	}
	sock := filepath.Join(t.TempDir(), "agent.sock")
	cmd := exec.Command(agentBin, append([]string{"--listen", "unix:" + sock}, args...)...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	return cmd, dial(t, sock)
}
