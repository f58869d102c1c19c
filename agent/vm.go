package main

// VM mode: the agent is /init of a Berth microVM's initramfs (see the
// microVM driver in src/drivers/microvm). It brings the guest up, runs the one
// workload described by the host, writes its output to the host's log file
// and its exit status to the host's exit file (both virtio-serial ports whose
// host side is a plain file, so nothing is lost while the host daemon is
// down), serves the agent protocol on the control port, and powers the VM off
// when the workload ends.
//
// Devices are found by name, never by probe order:
//   block:  virtio-blk serial "berth-root" (image, read-only ext4),
//           "berth-rw" (writable layer, ext4), "berth-cfg" (raw JSON config,
//           NUL-padded)
//   ports:  "berth.agent" (protocol), "berth.log" (k8s-file log lines),
//           "berth.exit" (one JSON exit record)

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// vmConfig is what the host writes to the berth-cfg disk.
type vmConfig struct {
	Args        []string          `json:"args"`
	Env         map[string]string `json:"env"`
	Cwd         string            `json:"cwd"`
	UID         uint32            `json:"uid"`
	GID         uint32            `json:"gid"`
	Hostname    string            `json:"hostname"`
	MemoryBytes int64             `json:"memoryBytes"`
	Pids        int64             `json:"pids"`
	CPUMillis   int64             `json:"cpuMillis"`
	// Sandbox: no workload of its own; the VM runs until the host asks for a
	// shutdown, and commands started with "run" go into the limited cgroup.
	Sandbox bool `json:"sandbox"`
	// Net: the task's address on its project network (absent: loopback only).
	Net *netConfig `json:"net,omitempty"`
}

// vmExit is the record written to the berth.exit port.
type vmExit struct {
	ExitCode   int    `json:"exitCode"`
	Signal     string `json:"signal,omitempty"`
	OOMKilled  bool   `json:"oomKilled"`
	FinishedAt string `json:"finishedAt"`
	Error      string `json:"error,omitempty"`
}

const (
	vmNewRoot  = "/mnt/root"
	vmCgroup   = "/sys/fs/cgroup/workload"
	maxLogLine = 16 << 10 // like conmon: longer lines are split into partial (P) records
)

// mainState is the workload's state, reported by hello in VM mode.
type mainState struct {
	mu    sync.Mutex
	pid   int
	state string // starting | running | exited | failed
	exit  *vmExit
}

func (m *mainState) snapshot() M {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := M{"pid": m.pid, "state": m.state}
	if m.exit != nil {
		out["exit"] = m.exit
	}
	return out
}

// isVMInit: PID 1 started by the kernel as /init.
func isVMInit() bool { return os.Getpid() == 1 && os.Args[0] == "/init" }

func vmMain() {
	log.SetPrefix("berth-agent: ")
	log.SetFlags(log.Lmicroseconds)
	ch := make(chan os.Signal, 4)
	notifyIgnored(ch)
	exitPort, err := vmBoot()
	// vmBoot returns only on failure: report it and power off.
	log.Printf("boot failed: %v", err)
	rec := vmExit{ExitCode: 127, FinishedAt: time.Now().UTC().Format(time.RFC3339Nano), Error: err.Error()}
	if exitPort != nil {
		writeExit(exitPort, &rec)
	}
	powerOff()
}

func powerOff() {
	unix.Sync()
	unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {} // PID 1 must not return
}

func writeExit(f *os.File, rec *vmExit) {
	b, _ := json.Marshal(rec)
	f.Write(append(b, '\n'))
	f.Sync()
}

func mountFS(src, target, fstype string, flags uintptr, data string) error {
	if err := os.MkdirAll(target, 0o755); err != nil {
		return fmt.Errorf("mkdir %s: %w", target, err)
	}
	if err := unix.Mount(src, target, fstype, flags, data); err != nil {
		return fmt.Errorf("mount %s on %s (%s): %w", src, target, fstype, err)
	}
	return nil
}

func vmBoot() (*os.File, error) {
	for _, m := range []struct{ src, target, fstype string }{
		{"devtmpfs", "/dev", "devtmpfs"}, {"proc", "/proc", "proc"}, {"sysfs", "/sys", "sysfs"},
	} {
		if err := mountFS(m.src, m.target, m.fstype, unix.MS_NOSUID, ""); err != nil {
			return nil, err
		}
	}
	if c, err := os.OpenFile("/dev/console", os.O_WRONLY, 0); err == nil {
		log.SetOutput(c)
	}
	setClockFromCmdline()
	if err := loadModules("/lib/modules"); err != nil {
		return nil, err
	}
	if cmdlineHas("berth.probe=1") {
		// The host's KVM probe: the kernel booted and ran init; that is all it asks.
		log.Printf("berth probe ok")
		powerOff()
	}
	devs, err := findDevices(30 * time.Second)
	if err != nil {
		return nil, err
	}
	quietKernel() // before the first write to a disk, which would start its writeback throttling
	exitPort, err := os.OpenFile(devs["berth.exit"], os.O_WRONLY, 0)
	if err != nil {
		return nil, fmt.Errorf("open exit port: %w", err)
	}
	logPort, err := os.OpenFile(devs["berth.log"], os.O_WRONLY, 0)
	if err != nil {
		return exitPort, fmt.Errorf("open log port: %w", err)
	}
	cfg, err := readConfig(devs["berth-cfg"])
	if err != nil {
		return exitPort, err
	}
	if err := mountRoot(devs["berth-root"], devs["berth-rw"]); err != nil {
		return exitPort, err
	}
	cgfd, err := setupCgroup(cfg)
	if err != nil {
		return exitPort, err
	}
	if cfg.Hostname != "" {
		unix.Sethostname([]byte(cfg.Hostname))
	}
	if cfg.Net != nil {
		if err := configureNetwork(cfg.Net, vmNewRoot); err != nil {
			return exitPort, fmt.Errorf("network: %w", err)
		}
	} else if lo, err := net.InterfaceByName("lo"); err == nil {
		setLink(lo.Index, nil, true)
	}
	root, err := OpenRoot(vmNewRoot)
	if err != nil {
		return exitPort, err
	}
	a := NewAgent(root, true, true)
	a.oom = newOOMCounter(vmCgroup + "/memory.events")
	if cfg.Sandbox {
		a.cgroupFD = cgfd
		a.exitPort = exitPort
		return exitPort, a.serveVport(devs["berth.agent"])
	}
	a.main = &mainState{state: "starting"}
	lw := &logWriter{f: logPort}
	pr, reaped, err := a.startMain(cfg, cgfd, lw)
	if err != nil {
		a.main.mu.Lock()
		a.main.state = "failed"
		a.main.exit = &vmExit{ExitCode: 127, FinishedAt: time.Now().UTC().Format(time.RFC3339Nano), Error: err.Error()}
		a.main.mu.Unlock()
		return exitPort, err
	}
	go func() {
		if err := a.serveVport(devs["berth.agent"]); err != nil {
			log.Printf("agent port: %v", err)
		}
	}()
	ws := a.wait(pr.p, reaped)
	// What the workload left behind goes with it, as when a container's PID 1 exits; this also
	// closes the pipes its descendants held, so the output is complete at once.
	os.WriteFile(vmCgroup+"/cgroup.kill", []byte("1"), 0)
	lw.wait()
	rec := vmExit{ExitCode: ws.ExitStatus(), FinishedAt: time.Now().UTC().Format(time.RFC3339Nano)}
	if ws.Signaled() {
		rec.ExitCode = 128 + int(ws.Signal())
		rec.Signal = unix.SignalName(ws.Signal())
		rec.OOMKilled = ws.Signal() == unix.SIGKILL && a.oom.count() > 0
	}
	a.procs.remove("main")
	a.main.mu.Lock()
	a.main.state, a.main.exit = "exited", &rec
	a.main.mu.Unlock()
	writeExit(exitPort, &rec)
	powerOff()
	return exitPort, nil
}

func notifyIgnored(ch chan os.Signal) {
	// Signals with a default "terminate" action would end PID 1 and panic the kernel.
	signal.Notify(ch, unix.SIGTERM, unix.SIGINT, unix.SIGHUP, unix.SIGPIPE)
	go func() {
		for range ch {
		}
	}()
}

func cmdlineHas(word string) bool {
	b, _ := os.ReadFile("/proc/cmdline")
	for _, f := range strings.Fields(string(b)) {
		if f == word {
			return true
		}
	}
	return false
}

// setClockFromCmdline sets the guest clock from berth.epoch_ms (the host's
// time when it launched the VM) plus the time since boot, so log timestamps
// line up with the host's events (the RTC only has whole seconds).
func setClockFromCmdline() {
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return
	}
	for _, f := range strings.Fields(string(b)) {
		if v, ok := strings.CutPrefix(f, "berth.epoch_ms="); ok {
			ms, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				return
			}
			var up unix.Timespec
			unix.ClockGettime(unix.CLOCK_BOOTTIME, &up)
			ns := ms*1e6 + up.Nano()
			tv := unix.NsecToTimeval(ns)
			unix.Settimeofday(&tv)
		}
	}
}

// stepClockForward sets the guest clock to epochMs (the host's time when it sent a request) if the
// guest's is behind it, and returns by how many ms it stepped it (0: not behind). A guest clock
// stands still while the VM is stopped and, in a VM restored from a snapshot, goes on from the
// snapshot's time; the one set at boot misses the time QEMU took to start the kernel. Never
// backwards: the request took some time to arrive, so a right clock is at or past the stamp, and
// a clock stepped to it is behind by that time only.
func stepClockForward(epochMs int64) int64 {
	behind := epochMs - time.Now().UnixMilli()
	if behind <= 0 {
		return 0
	}
	tv := unix.NsecToTimeval(epochMs * 1e6)
	if err := unix.Settimeofday(&tv); err != nil {
		log.Printf("setting the clock: %v", err)
		return 0
	}
	return behind
}

// loadModules inserts the modules listed, in order, in dir/order.
func loadModules(dir string) error {
	b, err := os.ReadFile(filepath.Join(dir, "order"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, name := range strings.Fields(string(b)) {
		f, err := os.Open(filepath.Join(dir, name))
		if err != nil {
			return fmt.Errorf("module %s: %w", name, err)
		}
		err = unix.FinitModule(int(f.Fd()), "", 0)
		f.Close()
		if err != nil && err != unix.EEXIST {
			return fmt.Errorf("insmod %s: %w", name, err)
		}
	}
	return nil
}

// findDevices maps the names above to device nodes, waiting for them to appear.
func findDevices(timeout time.Duration) (map[string]string, error) {
	want := []string{"berth-root", "berth-rw", "berth-cfg", "berth.agent", "berth.log", "berth.exit"}
	deadline := time.Now().Add(timeout)
	for {
		found := map[string]string{}
		blocks, _ := os.ReadDir("/sys/block")
		for _, e := range blocks {
			if s, err := os.ReadFile("/sys/block/" + e.Name() + "/serial"); err == nil {
				found[strings.TrimSpace(string(s))] = "/dev/" + e.Name()
			}
		}
		ports, _ := os.ReadDir("/sys/class/virtio-ports")
		for _, e := range ports {
			if s, err := os.ReadFile("/sys/class/virtio-ports/" + e.Name() + "/name"); err == nil {
				found[strings.TrimSpace(string(s))] = "/dev/" + e.Name()
			}
		}
		var missing []string
		for _, w := range want {
			if _, err := os.Stat(found[w]); found[w] == "" || err != nil {
				missing = append(missing, w)
			}
		}
		if len(missing) == 0 {
			return found, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("devices did not appear within %v: %s", timeout, strings.Join(missing, ", "))
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func readConfig(dev string) (*vmConfig, error) {
	b, err := os.ReadFile(dev)
	if err != nil {
		return nil, fmt.Errorf("read config disk: %w", err)
	}
	b = bytes.TrimRight(b, "\x00")
	cfg := &vmConfig{}
	if err := json.Unmarshal(b, cfg); err != nil {
		return nil, fmt.Errorf("config disk: %w", err)
	}
	if len(cfg.Args) == 0 && !cfg.Sandbox {
		return nil, errors.New("config disk: empty args")
	}
	return cfg, nil
}

// quietKernel turns off periodic guest kernel work that a sandbox VM does not need. Under TCG each
// wakeup costs host CPU while the VM idles, and a VM restored from a snapshot runs each timer that
// fell due for the first time, in guest code TCG translates afresh in every fork, beside the fork's
// first command (BENCHMARKS.md, session 16). Best effort: a knob the kernel lacks is skipped.
func quietKernel() {
	for _, k := range []struct{ path, value string }{
		// kcompactd's proactive compaction, which looks at fragmentation every 500 ms to keep huge
		// pages available: the guest makes none (Debian's cloud kernel defaults transparent huge
		// pages to never), and a sandbox's memory is small.
		{"/proc/sys/vm/compaction_proactiveness", "0"},
		// The per-CPU vmstat counters are folded into the global ones every second by default, and
		// also whenever one drifts past its threshold, so /proc/meminfo stays as close as before.
		{"/proc/sys/vm/stat_interval", "10"},
		// The lockup detectors: a per-CPU timer every 4 s that wakes the CPU's stopper thread. A
		// guest under TCG on a busy host is where they would cry wolf.
		{"/proc/sys/kernel/watchdog", "0"},
	} {
		if err := os.WriteFile(k.path, []byte(k.value), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
			log.Printf("%s: %v", k.path, err)
		}
	}
	// Writeback throttling: a timer per disk that samples its latency while it is written to. The
	// host's page cache is what absorbs a guest's writes here, not a device queue to keep short.
	wbt, _ := filepath.Glob("/sys/block/*/queue/wbt_lat_usec")
	for _, f := range wbt {
		os.WriteFile(f, []byte("0"), 0)
	}
}

// mountRoot makes vmNewRoot: the read-only image under an overlay whose upper
// layer is on the writable disk, plus the usual kernel file systems.
func mountRoot(rootDev, rwDev string) error {
	// no_prefetch_block_bitmaps: by default ext4 reads every block group's bitmap from a background
	// thread after mounting (to speed up the first allocations on big, fragmented disks), and that
	// thread exits when it is done. A VM snapshotted meanwhile (a template is taken seconds after
	// boot) ran the rest of it, and the thread's exit, in each of its forks, at the same moment as
	// the fork's first command: ~1,000 blocks of guest kernel code for TCG to translate
	// (BENCHMARKS.md, session 16). These disks are small and new; nothing is lost.
	if err := mountFS(rootDev, "/mnt/lower", "ext4", unix.MS_RDONLY, "no_prefetch_block_bitmaps"); err != nil {
		return err
	}
	// noinit_itable: the disk is made with lazy_itable_init (src/lib/disk.ts: a quick mkfs, a sparse
	// file), and the kernel would otherwise zero its inode tables from the same background thread
	// after every boot: guest CPU under TCG, and in a VM snapshotted meanwhile, again in each of its
	// forks. Unused inodes are never read either way (the group descriptors say which are); the
	// zeroing only helps an fsck.
	if err := mountFS(rwDev, "/mnt/rw", "ext4", unix.MS_NOSUID|unix.MS_NODEV, "noinit_itable,no_prefetch_block_bitmaps"); err != nil {
		return err
	}
	for _, d := range []string{"/mnt/rw/upper", "/mnt/rw/work"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	if err := mountFS("overlay", vmNewRoot, "overlay", 0, "lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work"); err != nil {
		return err
	}
	for _, m := range []struct {
		src, target, fstype string
		flags               uintptr
		data                string
	}{
		{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, ""},
		{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"},
		{"shm", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	} {
		if err := mountFS(m.src, vmNewRoot+m.target, m.fstype, m.flags, m.data); err != nil {
			return err
		}
	}
	return nil
}

// setupCgroup puts the workload's limits on a guest cgroup (v2) and returns
// its directory fd, for starting the workload directly inside it.
func setupCgroup(cfg *vmConfig) (int, error) {
	if err := mountFS("cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return -1, err
	}
	if err := os.WriteFile("/sys/fs/cgroup/cgroup.subtree_control", []byte("+memory +pids +cpu"), 0); err != nil {
		return -1, fmt.Errorf("enable cgroup controllers: %w", err)
	}
	if err := os.Mkdir(vmCgroup, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return -1, err
	}
	set := func(file, v string) error {
		if err := os.WriteFile(vmCgroup+"/"+file, []byte(v), 0); err != nil {
			return fmt.Errorf("cgroup %s=%s: %w", file, v, err)
		}
		return nil
	}
	if cfg.MemoryBytes > 0 {
		if err := set("memory.max", strconv.FormatInt(cfg.MemoryBytes, 10)); err != nil {
			return -1, err
		}
		set("memory.swap.max", "0") // no swap in the guest anyway; absent without CONFIG_MEMCG_SWAP
	}
	if cfg.Pids > 0 {
		if err := set("pids.max", strconv.FormatInt(cfg.Pids, 10)); err != nil {
			return -1, err
		}
	}
	if cfg.CPUMillis > 0 {
		if err := set("cpu.max", fmt.Sprintf("%d 100000", cfg.CPUMillis*100)); err != nil {
			return -1, err
		}
	}
	return unix.Open(vmCgroup, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
}

// startMain starts the workload inside its cgroup, chrooted to the new root,
// with its output going to the log port.
func (a *Agent) startMain(cfg *vmConfig, cgfd int, lw *logWriter) (*proc, chan syscall.WaitStatus, error) {
	env, pathEnv, err := buildEnv(cfg.Env)
	if err != nil {
		return nil, nil, err
	}
	path, err := lookPath(a.root, cfg.Args[0], pathEnv)
	if err != nil {
		return nil, nil, err
	}
	cwd := cfg.Cwd
	if cwd == "" {
		cwd = "/"
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, nil, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		return nil, nil, err
	}
	devnull, err := os.Open("/dev/null")
	if err != nil {
		return nil, nil, err
	}
	sys := &syscall.SysProcAttr{
		Setsid:      true,
		Chroot:      vmNewRoot,
		Credential:  &syscall.Credential{Uid: cfg.UID, Gid: cfg.GID},
		UseCgroupFD: true,
		CgroupFD:    cgfd,
	}
	attr := &os.ProcAttr{Dir: cwd, Env: env, Files: []*os.File{devnull, outW, errW}, Sys: sys}
	p, reaped, err := a.reaper.start(path, cfg.Args, attr)
	devnull.Close()
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		return nil, nil, fmt.Errorf("%s: %w", cfg.Args[0], err)
	}
	pr := &proc{id: "main", args: cfg.Args, p: p, started: time.Now()}
	a.procs.add(pr)
	a.main.mu.Lock()
	a.main.pid, a.main.state = p.Pid, "running"
	a.main.mu.Unlock()
	lw.pump(outR, "stdout")
	lw.pump(errR, "stderr")
	return pr, reaped, nil
}

// logWriter writes k8s-file records ("<RFC 3339 time> <stream> <F|P> <text>")
// to the log port, like conmon does on the host for the other tiers.
type logWriter struct {
	mu      sync.Mutex
	f       *os.File
	wg      sync.WaitGroup
	max     int64 // > 0: the file is truncated when it grows past this (like conmon's --log-size-max)
	written int64
}

func (lw *logWriter) record(stream string, partial bool, text []byte) {
	tag := " F "
	if partial {
		tag = " P "
	}
	line := make([]byte, 0, len(text)+48)
	line = time.Now().UTC().AppendFormat(line, "2006-01-02T15:04:05.000000000Z07:00")
	line = append(line, ' ')
	line = append(line, stream...)
	line = append(line, tag...)
	line = append(line, text...)
	line = append(line, '\n')
	lw.mu.Lock()
	if lw.max > 0 && lw.written+int64(len(line)) > lw.max {
		lw.f.Truncate(0)
		lw.written = 0
	}
	n, _ := lw.f.Write(line)
	lw.written += int64(n)
	lw.mu.Unlock()
}

// pump reads one stream until every writer has closed it (the workload and
// anything it left running are killed with the cgroup when it exits).
func (lw *logWriter) pump(r *os.File, stream string) {
	lw.wg.Add(1)
	go func() {
		defer lw.wg.Done()
		defer r.Close()
		buf := make([]byte, 0, maxLogLine)
		chunk := make([]byte, 32<<10)
		for {
			n, err := r.Read(chunk)
			data := chunk[:n]
			for len(data) > 0 {
				i := bytes.IndexByte(data, '\n')
				if i < 0 {
					room := maxLogLine - len(buf)
					if len(data) < room {
						buf = append(buf, data...)
						break
					}
					buf = append(buf, data[:room]...)
					lw.record(stream, true, buf)
					buf = buf[:0]
					data = data[room:]
					continue
				}
				buf = append(buf, data[:i]...)
				for len(buf) > maxLogLine {
					lw.record(stream, true, buf[:maxLogLine])
					buf = buf[maxLogLine:]
				}
				lw.record(stream, false, buf)
				buf = buf[:0]
				data = data[i+1:]
			}
			if err != nil {
				if len(buf) > 0 {
					lw.record(stream, true, buf)
				}
				return
			}
		}
	}()
}

// wait waits for both streams, at most drainGrace after the workload exited
// (a descendant may still hold a pipe; it is killed with the cgroup next).
func (lw *logWriter) wait() {
	done := make(chan struct{})
	go func() { lw.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(drainGrace):
	}
}
