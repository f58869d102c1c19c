package main

import (
	"errors"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Root resolves request paths inside a directory, like a chroot: ".." never
// climbs above it and absolute symlinks start again at it.
type Root struct {
	Path string
	fd   int // O_PATH descriptor of the root directory

	noOpenat2 atomic.Bool // set once openat2 reports ENOSYS (or forced in tests)
}

const maxSymlinks = 40

func OpenRoot(path string) (*Root, error) {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	return &Root{Path: path, fd: fd}, nil
}

// cleanPath turns a request path into a clean path relative to the root
// ("." for the root itself). Absolute paths are taken relative to the root;
// a ".." that would climb above the root is refused.
func cleanPath(p string) (string, error) {
	if p == "" {
		return "", errf(CodeInvalidArgument, "empty path")
	}
	if strings.IndexByte(p, 0) >= 0 {
		return "", errf(CodeInvalidArgument, "path contains NUL")
	}
	var out []string
	for _, c := range strings.Split(p, "/") {
		switch c {
		case "", ".":
		case "..":
			if len(out) == 0 {
				return "", errf(CodePermissionDenied, "path %q escapes the root", p)
			}
			out = out[:len(out)-1]
		default:
			out = append(out, c)
		}
	}
	if len(out) == 0 {
		return ".", nil
	}
	return strings.Join(out, "/"), nil
}

// splitPath returns the parent directory and final name of a clean path.
func splitPath(clean string) (dir, name string, err error) {
	if clean == "." {
		return "", "", errf(CodeInvalidArgument, "operation not allowed on the root itself")
	}
	i := strings.LastIndexByte(clean, '/')
	if i < 0 {
		return ".", clean, nil
	}
	return clean[:i], clean[i+1:], nil
}

// Open opens a clean relative path inside the root with the given open(2) flags.
// Symlinks (including the final component) are followed, confined to the root.
func (r *Root) Open(rel string, flags int, mode uint32) (int, error) {
	flags |= unix.O_CLOEXEC
	if !r.noOpenat2.Load() {
		how := unix.OpenHow{
			Flags:   uint64(flags),
			Mode:    uint64(mode),
			Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
		}
		for i := 0; ; i++ {
			fd, err := unix.Openat2(r.fd, rel, &how)
			if err == unix.EAGAIN && i < 16 { // a concurrent rename raced the lookup
				continue
			}
			if err == unix.EINTR {
				continue
			}
			if err != unix.ENOSYS {
				return fd, err
			}
			r.noOpenat2.Store(true)
			break
		}
	}
	return r.walkOpen(rel, flags, mode)
}

// walkOpen is the fallback for kernels without openat2 (< 5.6): it resolves one
// component at a time with O_NOFOLLOW, follows symlinks by hand and handles
// ".." with a stack of directory descriptors, so it never leaves the root.
func (r *Root) walkOpen(rel string, flags int, mode uint32) (int, error) {
	root, err := unix.Openat(r.fd, ".", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	stack := []int{root}
	defer func() {
		for _, fd := range stack {
			unix.Close(fd)
		}
	}()
	comps := strings.Split(rel, "/")
	links := 0
	for {
		// Skip "." and apply ".." (never popping the root itself).
		for len(comps) > 0 && (comps[0] == "" || comps[0] == "." || comps[0] == "..") {
			if comps[0] == ".." && len(stack) > 1 {
				unix.Close(stack[len(stack)-1])
				stack = stack[:len(stack)-1]
			}
			comps = comps[1:]
		}
		cur := stack[len(stack)-1]
		if len(comps) == 0 { // the path ends on a directory we already hold
			return unix.Openat(cur, ".", flags, mode)
		}
		name := comps[0]
		comps = comps[1:]
		var target string
		if len(comps) == 0 {
			// Final component: open it for real, refusing to follow a symlink here.
			fd, err := unix.Openat(cur, name, flags|unix.O_NOFOLLOW, mode)
			switch {
			case err == nil:
				if flags&unix.O_PATH == 0 || !isSymlinkFd(fd) {
					return fd, nil
				}
				target, err = readlinkFd(fd) // O_PATH|O_NOFOLLOW opened the link itself
				unix.Close(fd)
				if err != nil {
					return -1, err
				}
			case err == unix.ELOOP || err == unix.ENOTDIR:
				// A symlink refused by O_NOFOLLOW (or by O_DIRECTORY): follow it by hand.
				t, lerr := readlinkAt(cur, name)
				if lerr != nil {
					return -1, err
				}
				target = t
			default:
				return -1, err
			}
		} else {
			fd, err := unix.Openat(cur, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			if err != nil {
				return -1, err
			}
			var st unix.Stat_t
			if err := unix.Fstat(fd, &st); err != nil {
				unix.Close(fd)
				return -1, err
			}
			switch st.Mode & unix.S_IFMT {
			case unix.S_IFDIR:
				stack = append(stack, fd)
				continue
			case unix.S_IFLNK:
				target, err = readlinkFd(fd)
				unix.Close(fd)
				if err != nil {
					return -1, err
				}
			default:
				unix.Close(fd)
				return -1, unix.ENOTDIR
			}
		}
		// Splice the symlink target in front of the remaining components.
		if links++; links > maxSymlinks {
			return -1, unix.ELOOP
		}
		if strings.HasPrefix(target, "/") {
			for _, fd := range stack[1:] {
				unix.Close(fd)
			}
			stack = stack[:1]
		}
		comps = append(strings.Split(target, "/"), comps...)
	}
}

func isSymlinkFd(fd int) bool {
	var st unix.Stat_t
	return unix.Fstat(fd, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFLNK
}

func readlinkFd(fd int) (string, error) { return readlinkAt(fd, "") }

func readlinkAt(dirfd int, name string) (string, error) {
	buf := make([]byte, 4096)
	n, err := unix.Readlinkat(dirfd, name, buf)
	if err != nil {
		if err == unix.EINVAL { // no longer a symlink: it changed under us
			return "", errors.New("path changed during resolution")
		}
		return "", err
	}
	return string(buf[:n]), nil
}

// OpenParent resolves the parent directory of a clean path and returns an
// O_PATH descriptor to it plus the final name, which callers use with *at
// syscalls that never follow it.
func (r *Root) OpenParent(clean string) (int, string, error) {
	dir, name, err := splitPath(clean)
	if err != nil {
		return -1, "", err
	}
	fd, err := r.Open(dir, unix.O_PATH|unix.O_DIRECTORY, 0)
	return fd, name, err
}
