package main

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ReadChunk is the most file data carried by one "data" frame (base64 makes it ~342 KiB).
const ReadChunk = 256 << 10

const listBatch = 512

// errnoError maps an OS error to a protocol error code.
func errnoError(err error) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	var errno unix.Errno
	if !errors.As(err, &errno) {
		return &Error{Code: CodeInternal, Message: err.Error()}
	}
	code := CodeInternal
	switch errno {
	case unix.ENOENT, unix.ENOTDIR, unix.ESRCH:
		code = CodeNotFound
	case unix.EACCES, unix.EPERM, unix.EXDEV, unix.EROFS:
		code = CodePermissionDenied
	case unix.EEXIST, unix.ENOTEMPTY, unix.EISDIR, unix.ELOOP, unix.EBUSY, unix.ETXTBSY:
		code = CodeFailedPrecondition
	case unix.EINVAL, unix.ENAMETOOLONG:
		code = CodeInvalidArgument
	}
	return &Error{Code: code, Message: err.Error()}
}

func fileType(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return "file"
	case unix.S_IFDIR:
		return "dir"
	case unix.S_IFLNK:
		return "symlink"
	case unix.S_IFIFO:
		return "fifo"
	case unix.S_IFSOCK:
		return "socket"
	case unix.S_IFCHR:
		return "char"
	case unix.S_IFBLK:
		return "block"
	}
	return "other"
}

func statEntry(name string, st *unix.Stat_t) M {
	return M{
		"name":  name,
		"type":  fileType(st.Mode),
		"size":  st.Size,
		"mode":  st.Mode & 0o7777,
		"uid":   st.Uid,
		"gid":   st.Gid,
		"mtime": time.Unix(st.Mtim.Sec, st.Mtim.Nsec).UTC().Format(time.RFC3339Nano),
	}
}

// fileOp runs one file.* request. Streaming requests send their own frames and
// return (nil, nil); the others return the fields of their "ok" response.
func (a *Agent) fileOp(c *conn, req *Request) (M, error) {
	p, err := cleanPath(req.Path)
	if err != nil {
		return nil, err
	}
	switch req.Type {
	case "file.read":
		return nil, a.fileRead(c, req, p)
	case "file.list":
		return nil, a.fileList(c, req, p)
	case "file.write":
		flags := unix.O_WRONLY | unix.O_CREAT
		if req.Append {
			flags |= unix.O_APPEND
		} else {
			flags |= unix.O_TRUNC
		}
		mode := uint32(0o644)
		if req.Mode != nil {
			mode = *req.Mode & 0o7777
		}
		fd, err := a.root.Open(p, flags, mode)
		if err != nil {
			return nil, err
		}
		f := os.NewFile(uintptr(fd), p)
		defer f.Close()
		if req.Mode != nil { // apply exactly, regardless of umask or an existing file
			if err := f.Chmod(fs.FileMode(mode & 0o777)); err != nil {
				return nil, err
			}
		}
		if _, err := f.Write(req.Data); err != nil {
			return nil, err
		}
		return M{"written": len(req.Data)}, nil
	case "file.stat":
		dir, name, err := a.root.OpenParent(p)
		if err == nil {
			defer unix.Close(dir)
		} else if p == "." {
			dir, name, err = a.root.fd, ".", nil
		}
		if err != nil {
			return nil, err
		}
		var st unix.Stat_t
		if err := unix.Fstatat(dir, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return nil, err
		}
		m := statEntry(name, &st)
		if st.Mode&unix.S_IFMT == unix.S_IFLNK {
			if t, err := readlinkAt(dir, name); err == nil {
				m["target"] = t
			}
		}
		return M{"stat": m}, nil
	case "file.mkdir":
		mode, exact := uint32(0o755), req.Mode != nil
		if exact {
			mode = *req.Mode & 0o7777
		}
		if req.Parents {
			parts := strings.Split(p, "/")
			for i := 1; i < len(parts); i++ {
				if err := a.mkdir(strings.Join(parts[:i], "/"), mode, exact); err != nil && !errors.Is(err, unix.EEXIST) {
					return nil, err
				}
			}
			err := a.mkdir(p, mode, exact)
			if errors.Is(err, unix.EEXIST) {
				err = nil
			}
			return M{}, err
		}
		return M{}, a.mkdir(p, mode, exact)
	case "file.remove":
		dir, name, err := a.root.OpenParent(p)
		if err != nil {
			return nil, err
		}
		defer unix.Close(dir)
		if req.Recursive {
			return M{}, removeAll(dir, name)
		}
		err = unix.Unlinkat(dir, name, 0)
		if err == unix.EISDIR {
			err = unix.Unlinkat(dir, name, unix.AT_REMOVEDIR)
		}
		return M{}, err
	case "file.rename":
		to, err := cleanPath(req.To)
		if err != nil {
			return nil, err
		}
		fromDir, fromName, err := a.root.OpenParent(p)
		if err != nil {
			return nil, err
		}
		defer unix.Close(fromDir)
		toDir, toName, err := a.root.OpenParent(to)
		if err != nil {
			return nil, err
		}
		defer unix.Close(toDir)
		return M{}, unix.Renameat(fromDir, fromName, toDir, toName)
	}
	return nil, errf(CodeInvalidArgument, "unknown request type %q", req.Type)
}

func (a *Agent) mkdir(p string, mode uint32, exact bool) error {
	dir, name, err := a.root.OpenParent(p)
	if err != nil {
		return err
	}
	defer unix.Close(dir)
	if err := unix.Mkdirat(dir, name, mode); err != nil {
		return err
	}
	if exact { // mkdirat applies the umask; an explicit mode is applied as given
		fd, err := unix.Openat(dir, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Fchmod(fd, mode)
	}
	return nil
}

// removeAll removes name under dirfd and, if it is a directory, everything
// below it, never following symlinks.
func removeAll(dirfd int, name string) error {
	err := unix.Unlinkat(dirfd, name, 0)
	if err != unix.EISDIR {
		return err
	}
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	d := os.NewFile(uintptr(fd), name)
	for {
		names, err := d.Readdirnames(listBatch)
		for _, n := range names {
			if err := removeAll(fd, n); err != nil && err != unix.ENOENT {
				d.Close()
				return err
			}
		}
		if err == io.EOF || len(names) == 0 {
			break
		}
		if err != nil {
			d.Close()
			return err
		}
	}
	d.Close()
	return unix.Unlinkat(dirfd, name, unix.AT_REMOVEDIR)
}

// fileRead streams a regular file as "data" frames followed by "eof". Each
// frame is written before the next chunk is read, so memory stays bounded and
// a slow reader slows the agent down rather than filling its memory.
func (a *Agent) fileRead(c *conn, req *Request, p string) error {
	if req.Offset < 0 || req.Length < 0 {
		return errf(CodeInvalidArgument, "negative offset or length")
	}
	fd, err := a.root.Open(p, unix.O_RDONLY, 0)
	if err != nil {
		return err
	}
	f := os.NewFile(uintptr(fd), p)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		return errf(CodeFailedPrecondition, "%s is a directory", req.Path)
	}
	buf := make([]byte, ReadChunk)
	off, remaining := req.Offset, req.Length
	var total int64
	for {
		want := int64(len(buf))
		if req.Length > 0 && remaining < want {
			want = remaining
		}
		if want == 0 {
			break
		}
		n, err := f.ReadAt(buf[:want], off)
		if n > 0 {
			if serr := c.send(M{"id": req.ID, "type": "data", "offset": off, "data": buf[:n]}); serr != nil {
				return nil // connection gone; nobody to tell
			}
			off += int64(n)
			total += int64(n)
			remaining -= int64(n)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
	}
	c.send(M{"id": req.ID, "type": "eof", "size": total})
	return nil
}

// fileList streams directory entries (lstat, never following symlinks) as
// "entries" frames of at most listBatch entries, then "eof".
func (a *Agent) fileList(c *conn, req *Request, p string) error {
	fd, err := a.root.Open(p, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return err
	}
	d := os.NewFile(uintptr(fd), p)
	defer d.Close()
	total := 0
	for {
		names, rerr := d.Readdirnames(listBatch)
		entries := make([]M, 0, len(names))
		for _, n := range names {
			var st unix.Stat_t
			if err := unix.Fstatat(fd, n, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				continue // removed meanwhile
			}
			entries = append(entries, statEntry(n, &st))
		}
		if len(entries) > 0 {
			if err := c.send(M{"id": req.ID, "type": "entries", "entries": entries}); err != nil {
				return nil
			}
			total += len(entries)
		}
		if rerr == io.EOF || len(names) == 0 {
			break
		}
		if rerr != nil {
			return rerr
		}
	}
	c.send(M{"id": req.ID, "type": "eof", "count": total})
	return nil
}
