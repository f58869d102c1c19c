package main

import (
	"encoding/json"
	"errors"
	"io"
	"log"
	"os"
	"os/signal"
	"time"

	"golang.org/x/sys/unix"
)

// Version is the agent's own version, announced by hello.
const Version = "0.4.3" // 0.2.0: --conn-fd, and the monitor's --agent-fd; 0.3.0: the monitor's --agent-fd-pass; 0.4.0: hello's epochMs (a VM's clock); 0.4.1: a vport stays open across host connections; hello's answer has the guest's epochMs; 0.4.2: settle; 0.4.3: a VM turns off periodic kernel work it does not need

// Agent serves the protocol on connections; processes outlive connections.
type Agent struct {
	root     *Root
	reaper   *Reaper // nil unless PID 1 or --reaper
	poweroff bool    // --poweroff: shutdown{poweroff:true} powers off even when not PID 1
	procs    procTable
	exit     func(code int) // os.Exit; replaced in tests
	main     *mainState     // VM mode: the workload the VM exists for
	// reconnect is how often serveVport looks again for a host that has not
	// come back on a port (a fallback: the port's SIGIO wakes it when one does).
	reconnect time.Duration
	cgroupFD  int      // >= 0: processes started by "run" go into this cgroup (VM sandbox mode)
	exitPort  *os.File // VM sandbox mode: a shutdown writes the exit record here
	// oom counts the OOM kills of the cgroup the processes run in: the VM's workload cgroup, else
	// the agent's own cgroup as seen from inside a container (cgroup v2 or v1).
	oom    *oomCounter
	listen listenState
}

func NewAgent(root *Root, reap, poweroff bool) *Agent {
	a := &Agent{root: root, poweroff: poweroff, exit: os.Exit, reconnect: time.Second, cgroupFD: -1,
		oom: newOOMCounter("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control")}
	a.procs.byID = map[string]*proc{}
	if reap {
		a.reaper = NewReaper()
	}
	return a
}

func notifySIGCHLD(ch chan os.Signal) { signal.Notify(ch, unix.SIGCHLD) }

func (a *Agent) capabilities() []string {
	caps := []string{"run", "stdin", "signal", "list", "file.read", "file.write", "file.stat",
		"file.list", "file.mkdir", "file.remove", "file.rename", "ping", "shutdown", "tty", "resize", "watch", "cancel", "suspend"}
	if a.reaper != nil {
		caps = append(caps, "reaper")
	}
	if a.root.Path != "/" {
		caps = append(caps, "chroot")
	}
	return caps
}

// Serve handles one connection until it closes or breaks the framing rules.
func (a *Agent) Serve(rw io.ReadWriteCloser) {
	c := &conn{rw: rw}
	a.listen.track(c)
	defer a.listen.untrack(c)
	defer c.close()
	for {
		payload, err := readFrame(rw)
		if err == errFrameTooLarge {
			c.send(M{"id": "", "type": "error", "code": CodeInvalidArgument,
				"message": "frame exceeds the 1 MiB limit; closing the connection"})
			return
		}
		if err != nil {
			if err != io.EOF && !errors.Is(err, os.ErrClosed) {
				log.Printf("connection: %v", err)
			}
			return
		}
		req := &Request{}
		if err := decodeRequest(payload, req); err != nil {
			var idOnly struct {
				ID string `json:"id"`
			}
			json.Unmarshal(payload, &idOnly)
			c.sendError(idOnly.ID, errf(CodeInvalidArgument, "malformed frame: %v", err))
			continue
		}
		a.dispatch(c, req)
	}
}

// dispatch handles stdin, signal and shutdown in order, on the reading
// goroutine; everything else runs on its own goroutine.
func (a *Agent) dispatch(c *conn, req *Request) {
	reply := func(m M, err error) {
		if err != nil {
			c.sendError(req.ID, err)
			return
		}
		if m != nil {
			m["id"], m["type"] = req.ID, "ok"
			c.send(m)
		}
	}
	var steppedMs int64
	if req.EpochMs > 0 && a.poweroff { // poweroff is set in VM mode only: the guest's clock is its own
		steppedMs = stepClockForward(req.EpochMs)
	}
	switch req.Type {
	case "stdin":
		pr := a.procs.get(req.Proc)
		if pr == nil {
			reply(nil, errf(CodeNotFound, "no running process with id %q", req.Proc))
			return
		}
		if err := pr.queueStdin(stdinReq{c: c, id: req.ID, buf: req.Data, eof: req.EOF}); err != nil {
			reply(nil, err)
		}
	case "signal":
		reply(M{}, a.signal(req))
	case "resize":
		reply(M{}, a.resize(req))
	case "cancel":
		reply(M{}, a.cancel(c, req))
	case "watch":
		reply(nil, a.watch(c, req))
	case "shutdown":
		a.shutdown(c, req)
	case "suspend":
		a.suspend(c, req)
	case "run":
		reply(nil, a.run(c, req))
	case "hello":
		var u unix.Utsname
		unix.Uname(&u)
		m := M{"version": ProtocolVersion, "agent": "berth-agent/" + Version,
			"kernel": unix.ByteSliceToString(u.Release[:]), "pid": os.Getpid(),
			"capabilities": a.capabilities()}
		if a.main != nil {
			m["main"] = a.main.snapshot()
		}
		if steppedMs > 0 {
			m["clockSteppedMs"] = steppedMs
		}
		if a.poweroff { // VM mode: the guest's clock, for the host to check (PROTOCOL.md)
			m["epochMs"] = time.Now().UnixMilli()
		}
		reply(m, nil)
	case "ping":
		reply(M{}, nil)
	case "net.configure":
		if !a.poweroff || req.Net == nil { // poweroff is set in VM mode only
			reply(nil, errf(CodeInvalidArgument, "net.configure needs a \"net\" object and is served in VM mode only"))
			return
		}
		reply(M{}, configureNetwork(req.Net, vmNewRoot))
	case "settle":
		if !a.poweroff { // VM mode only: it waits on the guest's own links and syncs its disks
			reply(nil, errf(CodeInvalidArgument, "settle is served in VM mode only"))
			return
		}
		go func() { reply(settle("/sys/class/net", settleMaxWait), nil) }()
	case "list":
		reply(M{"processes": a.procs.list()}, nil)
	case "file.read", "file.write", "file.stat", "file.list", "file.mkdir", "file.remove", "file.rename":
		go func() { reply(a.fileOp(c, req)) }()
	default:
		reply(nil, errf(CodeInvalidArgument, "unknown request type %q", req.Type))
	}
}

func (a *Agent) shutdown(c *conn, req *Request) {
	c.send(M{"id": req.ID, "type": "ok"})
	if a.exitPort != nil {
		writeExit(a.exitPort, &vmExit{ExitCode: 0, FinishedAt: time.Now().UTC().Format(time.RFC3339Nano)})
	}
	unix.Sync()
	if req.Poweroff && (os.Getpid() == 1 || a.poweroff) {
		time.Sleep(100 * time.Millisecond) // let the acknowledgement leave the port
		err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
		log.Printf("poweroff failed: %v", err)
		a.exit(1)
		return
	}
	a.exit(0)
}
