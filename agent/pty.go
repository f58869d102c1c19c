package main

import (
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// Pseudo-terminals for "run" with tty: true. Own code over creack/pty: it is ~40 lines on top of
// golang.org/x/sys, and the master must come from the devpts instance inside --root (a microVM's
// guest root mounts its own "newinstance" devpts), which a library that opens /dev/ptmx would miss.

// openPty allocates a pseudo-terminal in the devpts of the agent's root and returns its master
// (non-blocking, so reads can be given deadlines) and slave, sized cols×rows.
func (a *Agent) openPty(cols, rows uint16) (master, slave *os.File, err error) {
	var mfd int
	for _, p := range []string{"dev/pts/ptmx", "dev/ptmx"} {
		mfd, err = a.root.Open(p, unix.O_RDWR|unix.O_NOCTTY|unix.O_NONBLOCK, 0)
		if err == nil {
			break
		}
	}
	if err != nil {
		return nil, nil, errf(CodeFailedPrecondition, "cannot open a pseudo-terminal master (is /dev/pts mounted in the sandbox?): %v", err)
	}
	if err := unix.IoctlSetPointerInt(mfd, unix.TIOCSPTLCK, 0); err != nil {
		unix.Close(mfd)
		return nil, nil, err
	}
	// TIOCGPTPEER opens the slave from the master, whatever the mount layout; older kernels and
	// gVisor may lack it, then the slave is opened by its number under the root's /dev/pts.
	sfd, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(mfd), unix.TIOCGPTPEER, uintptr(unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC))
	if e != 0 {
		n, err := unix.IoctlGetUint32(mfd, unix.TIOCGPTN)
		if err != nil {
			unix.Close(mfd)
			return nil, nil, err
		}
		fd, err := a.root.Open("dev/pts/"+strconv.Itoa(int(n)), unix.O_RDWR|unix.O_NOCTTY, 0)
		if err != nil {
			unix.Close(mfd)
			return nil, nil, err
		}
		sfd = uintptr(fd)
	}
	master = os.NewFile(uintptr(mfd), "ptmx")
	slave = os.NewFile(sfd, "pts")
	if err := setWinsize(master, cols, rows); err != nil {
		master.Close()
		slave.Close()
		return nil, nil, err
	}
	return master, slave, nil
}

func setWinsize(master *os.File, cols, rows uint16) error {
	if cols == 0 {
		cols = 80
	}
	if rows == 0 {
		rows = 24
	}
	rc, err := master.SyscallConn()
	if err != nil {
		return err
	}
	var ioErr error
	err = rc.Control(func(fd uintptr) {
		ioErr = unix.IoctlSetWinsize(int(fd), unix.TIOCSWINSZ, &unix.Winsize{Col: cols, Row: rows})
	})
	if err != nil {
		return err
	}
	return ioErr
}

// resize changes the window size of a process's terminal (the kernel sends SIGWINCH to its foreground group).
func (a *Agent) resize(req *Request) error {
	pr := a.procs.get(req.Proc)
	if pr == nil {
		return errf(CodeNotFound, "no running process with id %q", req.Proc)
	}
	if pr.pty == nil {
		return errf(CodeFailedPrecondition, "process %s has no terminal (start it with tty: true)", req.Proc)
	}
	if req.Cols == 0 || req.Rows == 0 {
		return errf(CodeInvalidArgument, "cols and rows must be 1 to 65535")
	}
	return setWinsize(pr.pty, req.Cols, req.Rows)
}
