package main

// `berth-agent monitor …`: a container monitor for Berth's container tiers, taking the subset of
// conmon's command line and protocol that Berth's OCI driver uses (src/drivers/oci/driver.ts), so
// that either can supervise a container:
//
//	-c/-u/-n ID  -r RUNTIME  -b BUNDLE  -p CTR_PIDFILE  -P MONITOR_PIDFILE  -l k8s-file:LOG
//	--log-size-max N  --exit-dir DIR  --persist-dir DIR  --runtime-arg ARG …  --restore DIR  (others ignored)
//	--agent-fd N: hand inherited fd N to the container as its fd 3 (the runtime's --preserve-fds 1;
//	  with --agent-fd-pass, runsc's --pass-fd 3:3: runsc has no --preserve-fds)
//	env _OCI_SYNCPIPE=3: one JSON line {"data": <container pid>} (or {"data": -1, "message": …})
//
// It runs `RUNTIME [args] create --bundle BUNDLE --pid-file CTR_PIDFILE ID` with the container's
// stdout/stderr on two pipes, becomes the child subreaper that inherits the container's init, writes
// the output as k8s-file records, and when the container exits writes its status (128+n for a
// signal) to EXIT_DIR/ID and an `oom` marker to PERSIST_DIR when its memory cgroup OOM-killed.
//
// Why not only Debian's conmon: conmon's start (exec and dynamic linking of glib, systemd and
// gcrypt) costs about 3 ms more than this static binary on every container start, measured on the
// start-latency path (bench/start-latency.ts); the driver can use either (BERTH_MONITOR=conmon).
//
// `berth-agent monitor --spare`: started ahead of time by berthd (src/drivers/oci/launcher.ts), it
// waits for its working directory and arguments on stdin (NUL-separated, until EOF) and then runs
// as above, so that a container start does not wait for the monitor's exec and Go runtime start.
// Stdin closed with nothing on it (berthd closing or dying): it exits quietly.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

type monitorArgs struct {
	id, runtime, bundle, ctrPid, monPid, log, exitDir, persistDir string
	restore                                                       string // --restore DIR: `RUNTIME restore --image-path DIR --detach` instead of create
	run                                                           bool   // --run: `RUNTIME run --detach` instead of create (no separate start)
	logMax                                                        int64
	runtimeArgs                                                   []string
	agentFD                                                       int  // --agent-fd: inherited fd passed on to the container as fd 3; -1: none
	agentFDPass                                                   bool // --agent-fd-pass: pass it with `--pass-fd 3:3` (runsc) instead of `--preserve-fds 1`
}

func parseMonitorArgs(args []string) (*monitorArgs, error) {
	m := &monitorArgs{logMax: 64 << 20, agentFD: -1}
	for i := 0; i < len(args); i++ {
		a := args[i]
		val := func() (string, error) {
			if i+1 >= len(args) {
				return "", fmt.Errorf("%s needs a value", a)
			}
			i++
			return args[i], nil
		}
		var err error
		var v string
		switch a {
		case "-c", "-u", "-n":
			v, err = val()
			m.id = v
		case "-r":
			m.runtime, err = val()
		case "-b":
			m.bundle, err = val()
		case "-p":
			m.ctrPid, err = val()
		case "-P":
			m.monPid, err = val()
		case "-l":
			v, err = val()
			m.log = strings.TrimPrefix(v, "k8s-file:")
		case "--log-size-max":
			v, err = val()
			if err == nil {
				m.logMax, err = strconv.ParseInt(v, 10, 64)
			}
		case "--exit-dir":
			m.exitDir, err = val()
		case "--persist-dir":
			m.persistDir, err = val()
		case "--restore":
			m.restore, err = val()
		case "--run":
			m.run = true
		case "--agent-fd":
			v, err = val()
			if err == nil {
				m.agentFD, err = strconv.Atoi(v)
				if err == nil && m.agentFD < 3 {
					err = fmt.Errorf("--agent-fd %d: want an inherited fd above 2", m.agentFD)
				}
			}
		case "--agent-fd-pass":
			m.agentFDPass = true
		case "--runtime-arg":
			v, err = val()
			m.runtimeArgs = append(m.runtimeArgs, v)
		case "--api-version", "--socket-dir-path", "--log-level":
			_, err = val()
		case "--syslog":
		default:
			return nil, fmt.Errorf("unknown argument %q", a)
		}
		if err != nil {
			return nil, err
		}
	}
	if m.id == "" || m.runtime == "" || m.bundle == "" || m.ctrPid == "" || m.log == "" || m.exitDir == "" {
		return nil, errors.New("needs -c, -r, -b, -p, -l and --exit-dir")
	}
	if m.agentFDPass && (m.agentFD < 0 || !m.run || m.restore != "") {
		return nil, errors.New("--agent-fd-pass needs --agent-fd and --run (runsc has --pass-fd on run only)")
	}
	return m, nil
}

func monitorMain(args []string) {
	spare := len(args) == 1 && args[0] == "--spare"
	if spare {
		words, err := io.ReadAll(os.Stdin)
		if err != nil || len(words) == 0 {
			os.Exit(0)
		}
		args = strings.Split(strings.TrimSuffix(string(words), "\x00"), "\x00")
		if err := os.Chdir(args[0]); err != nil {
			args = []string{"--chdir-failed", err.Error()} // reported below as a bad argument
		} else {
			args = args[1:]
		}
	}
	sync := os.NewFile(3, "syncpipe")
	report := func(v map[string]any) {
		if sync == nil {
			return
		}
		b, _ := json.Marshal(v)
		sync.Write(append(b, '\n'))
		sync.Close()
		sync = nil
	}
	m, err := parseMonitorArgs(args)
	if err != nil {
		report(map[string]any{"data": -1, "message": "berth-agent monitor: " + err.Error()})
		os.Exit(2)
	}
	if spare && m.agentFD != 4 {
		unix.Close(4) // a spare always has the launcher's socket pair as fd 4; unused here
	}
	// Nobody reads our own stdout/stderr once berthd has its answer: a write to a closed pipe on
	// fd 1 or 2 would kill a Go program, so both go to /dev/null.
	if null, err := os.OpenFile("/dev/null", os.O_RDWR, 0); err == nil {
		unix.Dup2(int(null.Fd()), 1)
		unix.Dup2(int(null.Fd()), 2)
	}
	if m.monPid != "" {
		os.WriteFile(m.monPid, []byte(strconv.Itoa(os.Getpid())), 0o644)
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		report(map[string]any{"data": -1, "message": "PR_SET_CHILD_SUBREAPER: " + err.Error()})
		os.Exit(1)
	}
	logf, err := os.OpenFile(m.log, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		report(map[string]any{"data": -1, "message": "log file: " + err.Error()})
		os.Exit(1)
	}
	outR, outW, _ := os.Pipe()
	errR, errW, _ := os.Pipe()
	// The runtime's own error messages (before the container exists) are told apart from the
	// container's output by reading stderr into a buffer until create has exited.
	verb := []string{"create"}
	if m.run {
		// Created and started by one runtime process (`run --detach`): one Go program start less
		// than create + start (runsc: ~30 ms). The container runs when the command exits.
		verb = []string{"run", "--detach"}
	}
	if m.restore != "" {
		// A checkpoint (runsc): restored and running when the command exits, like create+start.
		verb = []string{"restore", "--image-path", m.restore, "--detach"}
	}
	var agentConn *os.File
	if m.agentFD >= 0 {
		// The sandbox agent's host connection (berthd holds the other end): the runtime hands it to
		// the container's init, which is the agent, as fd 3. The monitor keeps no copy of it, so the
		// host sees the connection end when the agent does.
		unix.CloseOnExec(m.agentFD)
		agentConn = os.NewFile(uintptr(m.agentFD), "agent-conn")
		if m.agentFDPass {
			verb = append(verb, "--pass-fd", "3:3") // ExtraFiles[0] is fd 3 of the runtime
		} else {
			verb = append(verb, "--preserve-fds", "1")
		}
	}
	cmd := exec.Command(m.runtime, append(append(append([]string{}, m.runtimeArgs...), verb...), "--bundle", m.bundle, "--pid-file", m.ctrPid, m.id)...)
	cmd.Stdout, cmd.Stderr = outW, errW
	if agentConn != nil {
		cmd.ExtraFiles = []*os.File{agentConn}
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{}
	createErr := cmd.Start()
	outW.Close()
	errW.Close()
	if agentConn != nil {
		agentConn.Close()
	}
	if createErr == nil {
		createErr = cmd.Wait()
	}
	if createErr != nil {
		errR.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		var buf bytes.Buffer
		b := make([]byte, 64<<10)
		for {
			n, err := errR.Read(b)
			buf.Write(b[:n])
			if err != nil || buf.Len() > 64<<10 {
				break
			}
		}
		report(map[string]any{"data": -1, "message": strings.TrimSpace(buf.String())})
		os.Exit(1)
	}
	raw, err := os.ReadFile(m.ctrPid)
	pid, _ := strconv.Atoi(strings.TrimSpace(string(raw)))
	if err != nil || pid <= 0 {
		report(map[string]any{"data": -1, "message": "the runtime wrote no container pid"})
		os.Exit(1)
	}
	lw := &logWriter{f: logf, max: m.logMax}
	if st, err := logf.Stat(); err == nil {
		lw.written = st.Size() // a restarted task appends to its log
	}
	lw.pump(outR, "stdout")
	lw.pump(errR, "stderr")
	report(map[string]any{"data": pid})

	// Reap everything reparented to us; the container's init tells its end.
	var status unix.WaitStatus
	for {
		var ws unix.WaitStatus
		got, err := unix.Wait4(-1, &ws, 0, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			break // no children left: the container is gone without us seeing it (should not happen)
		}
		if got == pid {
			status = ws
			break
		}
	}
	lw.wait()
	code := status.ExitStatus()
	if status.Signaled() {
		code = 128 + int(status.Signal())
	}
	if m.persistDir != "" && oomKilledInBundleCgroup(m.bundle) {
		os.WriteFile(filepath.Join(m.persistDir, "oom"), nil, 0o644)
	}
	tmp := filepath.Join(m.exitDir, "."+m.id+".tmp")
	if os.WriteFile(tmp, []byte(strconv.Itoa(code)), 0o644) == nil {
		os.Rename(tmp, filepath.Join(m.exitDir, m.id))
	}
}

// oomKilledInBundleCgroup reads the OOM-kill count of the container's memory cgroup (its
// linux.cgroupsPath, absolute under the hierarchy root; cgroup v2 or v1).
func oomKilledInBundleCgroup(bundle string) bool {
	raw, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return false
	}
	var cfg struct {
		Linux struct {
			CgroupsPath string `json:"cgroupsPath"`
		} `json:"linux"`
	}
	if json.Unmarshal(raw, &cfg) != nil || cfg.Linux.CgroupsPath == "" {
		return false
	}
	p := cfg.Linux.CgroupsPath
	for _, f := range []string{"/sys/fs/cgroup" + p + "/memory.events", "/sys/fs/cgroup/memory" + p + "/memory.oom_control"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "oom_kill "); ok {
				n, _ := strconv.Atoi(strings.TrimSpace(v))
				return n > 0
			}
		}
	}
	return false
}
