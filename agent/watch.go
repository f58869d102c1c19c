package main

import (
	"encoding/binary"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Directory watches ("watch" requests) with inotify. Own code over fsnotify: fsnotify watches by
// path (a symlink planted in the sandbox could point a watch outside --root); here every directory
// is opened confined to the root first and the watch is added through its descriptor.

const (
	watchMask = unix.IN_CREATE | unix.IN_MODIFY | unix.IN_ATTRIB | unix.IN_DELETE | unix.IN_MOVED_FROM |
		unix.IN_MOVED_TO | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR
	maxWatches  = 8192 // directories per recursive watch
	watchBatch  = 128  // events per frame (paths ≤ 4 KiB keep a frame under 1 MiB)
	inotifyHead = unix.SizeofInotifyEvent
)

type watcher struct {
	a         *Agent
	c         *conn
	id        string
	f         *os.File
	recursive bool
	rootWd    int
	mu        sync.Mutex
	dirs      map[int]string // watch descriptor → directory, as a path inside the root ("/a/b")
}

// cancels holds the cancel functions of a connection's long-running requests (watches), by id.
type cancels struct {
	mu sync.Mutex
	m  map[string]func()
}

func (cs *cancels) add(id string, fn func()) bool {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if cs.m == nil {
		cs.m = map[string]func(){}
	}
	if _, dup := cs.m[id]; dup {
		return false
	}
	cs.m[id] = fn
	return true
}

func (cs *cancels) take(id string) func() {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	fn := cs.m[id]
	delete(cs.m, id)
	return fn
}

func (cs *cancels) all() {
	cs.mu.Lock()
	fns := cs.m
	cs.m = nil
	cs.mu.Unlock()
	for _, fn := range fns {
		fn()
	}
}

func (a *Agent) cancel(c *conn, req *Request) error {
	fn := c.cancels.take(req.Target)
	if fn == nil {
		return errf(CodeNotFound, "no watch with id %q on this connection", req.Target)
	}
	fn()
	return nil
}

// watch starts watching a directory; it returns once "ready" was sent (or with an error).
func (a *Agent) watch(c *conn, req *Request) error {
	clean, err := cleanPath(req.Path)
	if err != nil {
		return err
	}
	dfd, err := a.root.Open(clean, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return err
	}
	ifd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		unix.Close(dfd)
		return err
	}
	w := &watcher{a: a, c: c, id: req.ID, f: os.NewFile(uintptr(ifd), "inotify"), recursive: req.Recursive, dirs: map[int]string{}}
	display := "/"
	if clean != "." {
		display = "/" + clean
	}
	w.rootWd, err = w.add(dfd, display)
	unix.Close(dfd)
	if err != nil {
		w.f.Close()
		return err
	}
	if !c.cancels.add(req.ID, func() { w.f.Close() }) {
		w.f.Close()
		return errf(CodeFailedPrecondition, "a request with id %q is running", req.ID)
	}
	c.send(M{"id": req.ID, "type": "ready"})
	go w.loop()
	return nil
}

// add watches the directory open at dfd and, when recursive, the directories below it.
func (w *watcher) add(dfd int, display string) (int, error) {
	wd, err := unix.InotifyAddWatch(int(w.f.Fd()), "/proc/self/fd/"+strconv.Itoa(dfd), watchMask)
	if err != nil {
		return -1, err
	}
	w.mu.Lock()
	w.dirs[wd] = display
	n := len(w.dirs)
	w.mu.Unlock()
	if !w.recursive || n >= maxWatches {
		return wd, nil
	}
	rfd, err := unix.Openat(dfd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return wd, nil
	}
	d := os.NewFile(uintptr(rfd), display)
	entries, _ := d.ReadDir(-1)
	for _, e := range entries {
		if !e.IsDir() { // symlinks are not followed
			continue
		}
		sub, err := unix.Openat(rfd, e.Name(), unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			continue
		}
		w.add(sub, join(display, e.Name()))
		unix.Close(sub)
	}
	d.Close()
	return wd, nil
}

func join(dir, name string) string {
	if dir == "/" {
		return "/" + name
	}
	return dir + "/" + name
}

func (w *watcher) loop() {
	defer w.f.Close()
	buf := make([]byte, 256<<10)
	for {
		n, err := w.f.Read(buf[:64<<10])
		if err != nil {
			w.c.cancels.take(w.id)
			w.c.send(M{"id": w.id, "type": "eof"})
			return
		}
		// A rename's MOVED_TO may come in the next read: wait a moment for it, so the pair is one event.
		for endsWithMovedFrom(buf[:n]) && n+(64<<10) <= len(buf) {
			w.f.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
			m, err := w.f.Read(buf[n : n+64<<10])
			w.f.SetReadDeadline(time.Time{})
			if err != nil {
				break
			}
			n += m
		}
		evs, ended := w.parse(buf[:n])
		for len(evs) > 0 {
			k := min(len(evs), watchBatch)
			w.c.send(M{"id": w.id, "type": "events", "events": evs[:k]})
			evs = evs[k:]
		}
		if ended {
			w.c.cancels.take(w.id)
			w.c.send(M{"id": w.id, "type": "eof", "reason": "the watched directory was removed or moved"})
			return
		}
	}
}

func endsWithMovedFrom(b []byte) bool {
	var last uint32
	for len(b) >= inotifyHead {
		last = binary.NativeEndian.Uint32(b[4:])
		next := inotifyHead + int(binary.NativeEndian.Uint32(b[12:]))
		if next > len(b) {
			break
		}
		b = b[next:]
	}
	return last&unix.IN_MOVED_FROM != 0
}

// parse turns one read of inotify events into protocol events; a MOVED_FROM/MOVED_TO pair (same
// cookie, same read) is one rename. ended: the watched directory itself went away.
func (w *watcher) parse(b []byte) (evs []M, ended bool) {
	from := map[uint32]int{} // cookie → index in evs of the pending MOVED_FROM
	for len(b) >= inotifyHead {
		wd := int(int32(binary.NativeEndian.Uint32(b[0:])))
		mask := binary.NativeEndian.Uint32(b[4:])
		cookie := binary.NativeEndian.Uint32(b[8:])
		nameLen := int(binary.NativeEndian.Uint32(b[12:]))
		if inotifyHead+nameLen > len(b) {
			break
		}
		name := strings.TrimRight(string(b[inotifyHead:inotifyHead+nameLen]), "\x00")
		b = b[inotifyHead+nameLen:]
		if mask&unix.IN_Q_OVERFLOW != 0 {
			evs = append(evs, M{"type": "overflow"})
			continue
		}
		w.mu.Lock()
		dir, ok := w.dirs[wd]
		if mask&unix.IN_IGNORED != 0 {
			delete(w.dirs, wd)
		}
		w.mu.Unlock()
		if !ok {
			continue
		}
		if mask&(unix.IN_DELETE_SELF|unix.IN_MOVE_SELF|unix.IN_IGNORED) != 0 {
			if wd == w.rootWd {
				ended = true
			}
			continue
		}
		path := join(dir, name)
		isDir := mask&unix.IN_ISDIR != 0
		ev := M{"path": path}
		if isDir {
			ev["dir"] = true
		}
		switch {
		case mask&unix.IN_CREATE != 0:
			ev["type"] = "create"
			if isDir && w.recursive {
				w.addPath(path)
			}
		case mask&unix.IN_MODIFY != 0:
			ev["type"] = "write"
		case mask&unix.IN_ATTRIB != 0:
			ev["type"] = "chmod"
		case mask&unix.IN_DELETE != 0:
			ev["type"] = "remove"
		case mask&unix.IN_MOVED_FROM != 0:
			ev["type"] = "remove" // becomes a rename when its MOVED_TO follows
			from[cookie] = len(evs)
		case mask&unix.IN_MOVED_TO != 0:
			if i, ok := from[cookie]; ok {
				evs[i]["type"], evs[i]["to"] = "rename", path
				delete(from, cookie)
				if isDir && w.recursive {
					w.renameDirs(evs[i]["path"].(string), path)
				}
				continue
			}
			ev["type"] = "create"
			if isDir && w.recursive {
				w.addPath(path)
			}
		default:
			continue
		}
		evs = append(evs, ev)
	}
	return evs, ended
}

// addPath watches a directory that appeared inside a recursive watch (opened confined to the root).
func (w *watcher) addPath(display string) {
	fd, err := w.a.root.Open(strings.TrimPrefix(display, "/"), unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return
	}
	w.add(fd, display)
	unix.Close(fd)
}

// renameDirs keeps the paths of watched directories right after a directory moved inside the watch.
func (w *watcher) renameDirs(old, new string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for wd, d := range w.dirs {
		if d == old || strings.HasPrefix(d, old+"/") {
			w.dirs[wd] = new + strings.TrimPrefix(d, old)
		}
	}
}
