package main

import (
	"bytes"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// oomCounter reads the OOM-kill count of a memory cgroup ("oom_kill N" in cgroup v2's
// memory.events and in v1's memory.oom_control) through a descriptor opened once, with pread at
// offset 0, which makes the kernel generate the file afresh. Every command start reads it (the
// count before the process, to tell later whether a SIGKILL was the OOM killer's), and in a
// microVM each start is a first run of cold guest code: opening the file every time walked the
// path, set up a kernfs open file, registered it with the Go netpoller and tore all that down
// again, ~500 of the ~14,000 blocks TCG translates for a fork's first command (BENCHMARKS.md,
// session 16). A raw descriptor keeps it out of the netpoller (kernfs files are pollable).
type oomCounter struct {
	once  sync.Once
	paths []string
	fd    int
}

func newOOMCounter(paths ...string) *oomCounter { return &oomCounter{paths: paths, fd: -1} }

// count is the cgroup's OOM kills so far, or -1 when none of the files could be read.
func (o *oomCounter) count() int {
	o.once.Do(func() {
		for _, p := range o.paths {
			if fd, err := unix.Open(p, unix.O_RDONLY|unix.O_CLOEXEC, 0); err == nil {
				o.fd = fd
				return
			}
		}
	})
	if o.fd < 0 {
		return -1
	}
	var buf [512]byte
	n, err := unix.Pread(o.fd, buf[:], 0)
	if err != nil || n <= 0 {
		return -1
	}
	return parseOOMKill(buf[:n])
}

// parseOOMKill finds the "oom_kill N" line; -1 when there is none.
func parseOOMKill(b []byte) int {
	const key = "oom_kill "
	for len(b) > 0 {
		line := b
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			line, b = b[:i], b[i+1:]
		} else {
			b = nil
		}
		if bytes.HasPrefix(line, []byte(key)) {
			if n, err := strconv.Atoi(string(bytes.TrimSpace(line[len(key):]))); err == nil {
				return n
			}
		}
	}
	return -1
}
