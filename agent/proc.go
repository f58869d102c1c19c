package main

import (
	"errors"
	"os"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// drainGrace is how long, after a process has exited, the agent keeps waiting
// for more output on pipes that are still held open (by its descendants).
const drainGrace = 500 * time.Millisecond

// stdinQueue is how many stdin frames of one process may wait to be written.
const stdinQueue = 16

const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

type stdinReq struct {
	c   *conn
	id  string
	buf []byte
	eof bool
}

// proc is a process started by "run".
type proc struct {
	id      string
	args    []string
	p       *os.Process
	started time.Time
	c       *conn // the connection that started it; events go there

	stdinMu     sync.Mutex
	stdinCh     chan stdinReq // nil when started without stdin
	stdinClosed bool
	stdinW      *os.File
	pty         *os.File // the terminal's master, for tty processes
}

// procTable holds the running processes by request id.
type procTable struct {
	mu    sync.Mutex
	byID  map[string]*proc
	order []string
}

func (t *procTable) add(pr *proc) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, dup := t.byID[pr.id]; dup {
		return false
	}
	t.byID[pr.id] = pr
	t.order = append(t.order, pr.id)
	return true
}

func (t *procTable) get(id string) *proc {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.byID[id]
}

func (t *procTable) remove(id string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.byID, id)
	for i, x := range t.order {
		if x == id {
			t.order = append(t.order[:i], t.order[i+1:]...)
			break
		}
	}
}

func (t *procTable) list() []M {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]M, 0, len(t.order))
	for _, id := range t.order {
		pr := t.byID[id]
		out = append(out, M{"id": id, "pid": pr.p.Pid, "args": pr.args, "startedAt": pr.started.UTC().Format(time.RFC3339Nano)})
	}
	return out
}

// Reaper is the single wait loop used when the agent is PID 1 (or a child
// subreaper): it reaps every child, orphans included, and hands the status of
// the processes the agent started to their waiters.
//
// It peeks at an exited child with waitid(WNOWAIT), so the pid cannot be
// reused, then takes mu and reaps it. start() holds mu from fork until the pid
// is registered, so a fast-exiting child is never reaped before its waiter exists.
type Reaper struct {
	mu      sync.Mutex
	waiters map[int]chan syscall.WaitStatus
}

func NewReaper() *Reaper {
	r := &Reaper{waiters: map[int]chan syscall.WaitStatus{}}
	sig := make(chan os.Signal, 1)
	notifySIGCHLD(sig)
	go r.loop(sig)
	return r
}

// start forks a process and registers its pid before any reaping can happen.
func (r *Reaper) start(path string, args []string, attr *os.ProcAttr) (*os.Process, chan syscall.WaitStatus, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	p, err := os.StartProcess(path, args, attr)
	if err != nil {
		return nil, nil, err
	}
	ch := make(chan syscall.WaitStatus, 1)
	r.waiters[p.Pid] = ch
	return p, ch, nil
}

// siginfoPid extracts si_pid, which sits right after three int32s, aligned to a pointer.
func siginfoPid(info *unix.Siginfo) int {
	const ptr = unsafe.Sizeof(uintptr(0))
	off := (12 + ptr - 1) &^ (ptr - 1)
	return int(*(*int32)(unsafe.Add(unsafe.Pointer(info), off)))
}

func (r *Reaper) loop(sig chan os.Signal) {
	for {
		for {
			var info unix.Siginfo
			err := unix.Waitid(unix.P_ALL, 0, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil)
			if err == unix.EINTR {
				continue
			}
			pid := siginfoPid(&info)
			if err != nil || pid == 0 {
				break
			}
			r.mu.Lock()
			var ws unix.WaitStatus
			got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
			ch := r.waiters[pid]
			if got == pid && err == nil {
				delete(r.waiters, pid)
			} else {
				ch = nil
			}
			r.mu.Unlock()
			if ch != nil {
				ch <- syscall.WaitStatus(ws)
			}
		}
		<-sig
	}
}

// buildEnv makes a process environment from a map (sorted; PATH added when
// missing) and returns the PATH to look the executable up in.
func buildEnv(m map[string]string) (env []string, pathEnv string, err error) {
	env = make([]string, 0, len(m)+1)
	pathEnv, hasPath := m["PATH"]
	if !hasPath {
		pathEnv = defaultPath
		env = append(env, "PATH="+defaultPath)
	}
	for k, v := range m {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.IndexByte(v, 0) >= 0 {
			return nil, "", errf(CodeInvalidArgument, "invalid environment variable %q", k)
		}
		env = append(env, k+"="+v)
	}
	sort.Strings(env)
	return env, pathEnv, nil
}

func lookPath(root *Root, name, pathEnv string) (string, error) {
	if strings.Contains(name, "/") {
		return name, nil
	}
	for _, dir := range strings.Split(pathEnv, ":") {
		if dir == "" || !strings.HasPrefix(dir, "/") {
			continue
		}
		p := dir + "/" + name
		clean, err := cleanPath(p)
		if err != nil {
			continue
		}
		fd, err := root.Open(clean, unix.O_PATH, 0)
		if err != nil {
			continue
		}
		var st unix.Stat_t
		err = unix.Fstat(fd, &st)
		unix.Close(fd)
		if err == nil && st.Mode&unix.S_IFMT == unix.S_IFREG && st.Mode&0o111 != 0 {
			return p, nil
		}
	}
	return "", errf(CodeNotFound, "%s: executable not found in PATH", name)
}

// warmSpawn runs warmSpawnPath once, when the agent first listens.
var warmSpawn sync.Once

// warmSpawnPath does, while the host is still connecting, the one-time work of the first process
// start that does not depend on the command: Go's os package probes pidfd support once per process,
// and that probe clones a child (checkClonePidfd). Inside gVisor a clone costs about a millisecond;
// done here it is off the first command's path. Under the reaper's lock, like a start: the reaper
// must not reap the probe's child before the probe waits for it.
func (a *Agent) warmSpawnPath() {
	if a.reaper != nil {
		a.reaper.mu.Lock()
		defer a.reaper.mu.Unlock()
	}
	if p, err := os.FindProcess(os.Getpid()); err == nil {
		p.Release()
	}
}

// run starts a process and streams its events; it returns once "started" has
// been sent (or with an error, in which case nothing was started).
func (a *Agent) run(c *conn, req *Request) error {
	if len(req.Args) == 0 || req.Args[0] == "" {
		return errf(CodeInvalidArgument, "args must not be empty")
	}
	if req.ID == "" {
		return errf(CodeInvalidArgument, "run needs an id")
	}
	if a.procs.get(req.ID) != nil {
		return errf(CodeFailedPrecondition, "a process with id %q is running", req.ID)
	}
	env, pathEnv, err := buildEnv(req.Env)
	if err != nil {
		return err
	}
	path, err := lookPath(a.root, req.Args[0], pathEnv)
	if err != nil {
		return err
	}

	sys := &syscall.SysProcAttr{Setpgid: !req.TTY}
	if req.TTY {
		// A session of its own with the terminal as controlling tty (its pgid is its pid too).
		sys.Setsid, sys.Setctty, sys.Ctty = true, true, 0
	}
	if a.root.Path != "/" {
		sys.Chroot = a.root.Path
	}
	if a.cgroupFD >= 0 {
		sys.UseCgroupFD, sys.CgroupFD = true, a.cgroupFD
	}
	if req.UID != nil || req.GID != nil {
		cred := &syscall.Credential{Uid: uint32(os.Getuid()), Gid: uint32(os.Getgid()), NoSetGroups: os.Getuid() != 0}
		if req.UID != nil {
			cred.Uid = *req.UID
		}
		if req.GID != nil {
			cred.Gid = *req.GID
		}
		sys.Credential = cred
	}
	cwd := req.Cwd
	if cwd == "" {
		cwd = "/"
	}

	var stdinR, stdinW, outR, outW, errR, errW, master *os.File
	var files []*os.File
	if req.TTY {
		var slave *os.File
		if master, slave, err = a.openPty(req.Cols, req.Rows); err != nil {
			return err
		}
		files = []*os.File{slave, slave, slave}
		defer slave.Close()
	} else {
		if stdinR, stdinW, err = os.Pipe(); err != nil {
			return err
		}
		if outR, outW, err = os.Pipe(); err != nil {
			return err
		}
		if errR, errW, err = os.Pipe(); err != nil {
			return err
		}
		files = []*os.File{stdinR, outW, errW}
	}
	closeAll := func(fs ...*os.File) {
		for _, f := range fs {
			if f != nil {
				f.Close()
			}
		}
	}
	attr := &os.ProcAttr{Dir: cwd, Env: env, Files: files, Sys: sys}
	ooms0 := a.oom.count()
	var p *os.Process
	var reaped chan syscall.WaitStatus
	if a.reaper != nil {
		p, reaped, err = a.reaper.start(path, req.Args, attr)
	} else {
		p, err = os.StartProcess(path, req.Args, attr)
	}
	closeAll(stdinR, outW, errW)
	if err != nil {
		closeAll(stdinW, outR, errR, master)
		return err
	}
	pr := &proc{id: req.ID, args: req.Args, p: p, started: time.Now(), c: c, pty: master}
	if master != nil {
		// The terminal is both ends: input is written to the master, output read from it.
		stdinW, outR = master, master
	}
	if req.Stdin || master != nil {
		pr.stdinW = stdinW
		pr.stdinCh = make(chan stdinReq, stdinQueue)
		go pr.stdinLoop()
	} else {
		stdinW.Close() // the process reads EOF at once
	}
	if !a.procs.add(pr) {
		// Lost a race with another run using the same id.
		p.Kill()
		go a.wait(p, reaped)
		return errf(CodeFailedPrecondition, "a process with id %q is running", req.ID)
	}
	c.send(M{"id": req.ID, "type": "started", "pid": p.Pid})

	var wg sync.WaitGroup
	exited := make(chan struct{})
	wg.Add(1)
	go pr.pump(&wg, outR, "stdout", exited)
	if errR != nil {
		wg.Add(1)
		go pr.pump(&wg, errR, "stderr", exited)
	}
	go func() {
		ws := a.wait(p, reaped)
		close(exited)
		wg.Wait() // all output is sent before "exit"
		pr.closeStdin()
		ev := M{"id": req.ID, "type": "exit", "code": ws.ExitStatus(), "oomKilled": false}
		if ws.Signaled() {
			ev["code"] = 128 + int(ws.Signal())
			ev["signal"] = unix.SignalName(ws.Signal())
			// Killed while the memory cgroup it runs in recorded a new OOM kill: the OOM killer.
			ev["oomKilled"] = ws.Signal() == unix.SIGKILL && ooms0 >= 0 && a.oom.count() > ooms0
		}
		a.procs.remove(req.ID)
		c.send(ev)
	}()
	return nil
}

func (a *Agent) wait(p *os.Process, reaped chan syscall.WaitStatus) syscall.WaitStatus {
	if reaped != nil {
		return <-reaped
	}
	st, err := p.Wait()
	if err != nil {
		return syscall.WaitStatus(255 << 8)
	}
	return st.Sys().(syscall.WaitStatus)
}

// pump relays one output pipe. Once the process has exited it stops after
// drainGrace without new data, so descendants holding the pipe cannot delay
// "exit" forever. Output is always drained, even when the connection is gone.
func (pr *proc) pump(wg *sync.WaitGroup, f *os.File, stream string, exited chan struct{}) {
	defer wg.Done()
	defer f.Close()
	go func() {
		<-exited
		f.SetReadDeadline(time.Now().Add(drainGrace))
	}()
	buf := getPumpBuf()
	defer putPumpBuf(buf)
	for {
		n, err := f.Read(buf)
		if n > 0 {
			pr.c.sendData(pr.id, stream, buf[:n])
		}
		if err != nil {
			return
		}
		select {
		case <-exited:
			f.SetReadDeadline(time.Now().Add(drainGrace))
		default:
		}
	}
}

// pumpBufs keeps the pumps' read buffers for the next commands. A 64 KiB buffer is a large
// object to Go's allocator, which takes a path of its own (spans, the page allocator): in a
// microVM forked from a snapshot, ~150 blocks of the first command for TCG to translate
// (BENCHMARKS.md, session 16). Eight buffers (512 KiB) are kept at most.
var pumpBufs = make(chan []byte, 8)

func getPumpBuf() []byte {
	select {
	case b := <-pumpBufs:
		return b
	default:
		return make([]byte, 64<<10)
	}
}

func putPumpBuf(b []byte) {
	select {
	case pumpBufs <- b:
	default:
	}
}

func (pr *proc) stdinLoop() {
	for r := range pr.stdinCh {
		var err error
		if len(r.buf) > 0 {
			_, err = pr.stdinW.Write(r.buf)
		}
		if err == nil && r.eof {
			if pr.pty != nil {
				_, err = pr.stdinW.Write([]byte{4}) // a terminal has no end of input: EOF is Ctrl-D
			} else {
				err = pr.stdinW.Close()
			}
		}
		if err != nil {
			if errors.Is(err, os.ErrClosed) || errors.Is(err, syscall.EPIPE) {
				err = errf(CodeFailedPrecondition, "stdin of %s is closed", pr.id)
			}
			r.c.sendError(r.id, err)
			continue
		}
		r.c.send(M{"id": r.id, "type": "ok"})
	}
}

// queueStdin hands a stdin frame to the process's writer; it never blocks.
func (pr *proc) queueStdin(r stdinReq) error {
	pr.stdinMu.Lock()
	defer pr.stdinMu.Unlock()
	if pr.stdinCh == nil {
		return errf(CodeFailedPrecondition, "process %s was started without stdin", pr.id)
	}
	if pr.stdinClosed {
		return errf(CodeFailedPrecondition, "stdin of %s is closed", pr.id)
	}
	select {
	case pr.stdinCh <- r:
	default:
		return errf(CodeFailedPrecondition, "stdin backlog of %s is full (%d frames); wait for acknowledgements", pr.id, stdinQueue)
	}
	if r.eof {
		pr.stdinClosed = true
		close(pr.stdinCh)
	}
	return nil
}

func (pr *proc) closeStdin() {
	pr.stdinMu.Lock()
	defer pr.stdinMu.Unlock()
	if pr.stdinCh == nil {
		return
	}
	if !pr.stdinClosed {
		pr.stdinClosed = true
		close(pr.stdinCh)
	}
	pr.stdinW.Close() // unblocks a pending write; queued frames get errors
}

func (a *Agent) signal(req *Request) error {
	pr := a.procs.get(req.Proc)
	if pr == nil {
		return errf(CodeNotFound, "no running process with id %q", req.Proc)
	}
	name := strings.ToUpper(req.Sig)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	sig := unix.SignalNum(name)
	if sig == 0 {
		return errf(CodeInvalidArgument, "unknown signal %q", req.Sig)
	}
	var err error
	if req.Group {
		err = unix.Kill(-pr.p.Pid, sig)
	} else {
		err = pr.p.Signal(sig)
	}
	if errors.Is(err, os.ErrProcessDone) {
		return errf(CodeFailedPrecondition, "process %s has already exited", req.Proc)
	}
	return err
}
