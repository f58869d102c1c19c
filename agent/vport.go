package main

import (
	"log"
	"os"
	"os/signal"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// serveVport serves a virtio-serial port, one host connection at a time.
//
// The port stays open for the agent's life. Closing it (as the agent once did
// at each host disconnect, to reopen it for the next connection) makes the
// guest's virtio console driver discard input already queued for the port: a
// host that reconnected in that moment lost its first request, and a stop()
// that had to deliver a signal waited out its timeout and escalated to SIGKILL.
//
// While the host is disconnected, reads return EOF at once and poll reports
// POLLHUP, so neither can wait for the host to come back. The driver raises
// SIGIO on an O_ASYNC port when the host connects; the agent sleeps until then
// (with a.reconnect as a fallback) instead of polling, which kept an idle
// workload VM's vCPU busy.
func (a *Agent) serveVport(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	hostUp := make(chan os.Signal, 1)
	signal.Notify(hostUp, unix.SIGIO) // before O_ASYNC: SIGIO's default action ends the process
	raw, err := f.SyscallConn()
	if err != nil {
		return err
	}
	control := func(fn func(fd int) error) error {
		var ferr error
		if err := raw.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
			return err
		}
		return ferr
	}
	if err := control(func(fd int) error { _, err := unix.FcntlInt(uintptr(fd), unix.F_SETOWN, os.Getpid()); return err }); err != nil {
		return err
	}
	// O_ASYNC only while waiting: when connected, each arrival of data would raise SIGIO too.
	setAsync := func(on bool) error {
		return control(func(fd int) error {
			fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
			if err != nil {
				return err
			}
			if on {
				fl |= unix.O_ASYNC
			} else {
				fl &^= unix.O_ASYNC
			}
			_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl)
			return err
		})
	}
	hostGone := func() bool {
		gone := false
		control(func(fd int) error {
			p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			if n, err := unix.Poll(p, 0); err == nil && n == 1 {
				gone = p[0].Revents&unix.POLLHUP != 0
			}
			return nil
		})
		return gone
	}
	for {
		if err := f.SetWriteDeadline(time.Time{}); err != nil { // (set by the last session's end)
			return err
		}
		a.Serve(&vportSession{f: f})
		if err := setAsync(true); err != nil {
			return err
		}
		for len(hostUp) > 0 {
			<-hostUp // raised before this wait began
		}
		for hostGone() {
			select {
			case <-hostUp:
			case <-time.After(a.reconnect):
			}
		}
		if err := setAsync(false); err != nil {
			return err
		}
	}
}

// vportSession is one host connection on a port that stays open: Close ends
// the session (later writes fail) without closing the port, once a write in
// progress has finished or given up, so that no part of this session's frames
// reaches the host's next connection.
type vportSession struct {
	f      *os.File
	mu     sync.Mutex
	closed bool
}

func (s *vportSession) Read(p []byte) (int, error) { return s.f.Read(p) }

func (s *vportSession) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return 0, os.ErrClosed
	}
	return s.f.Write(p)
}

func (s *vportSession) Close() error {
	// A send blocked on a host that went away must not go on into the host's next connection, nor
	// hold s.mu until then. (With QEMU 7.2 and Debian 12's kernel it ends when the host leaves:
	// agent-channel.test.ts floods a host that stops reading and leaves; the deadline makes it so.)
	if err := s.f.SetWriteDeadline(time.Now()); err != nil {
		log.Printf("vport: %v", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	return nil
}
