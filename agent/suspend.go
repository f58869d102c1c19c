package main

import (
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// "suspend": for a checkpoint of the sandbox by its runtime. gVisor cannot save a socket bound to a
// host path (the agent's listener and the host's connections to it), so the agent closes all of
// them and listens again once the host creates <socket dir>/agent.resume (in a restored copy: the
// new sandbox's folder), or after timeoutMs so that a failed checkpoint never leaves it deaf.

const resumeFile = "agent.resume"

type listenState struct {
	mu        sync.Mutex
	path      string // unix socket path; "" when not listening on one
	l         net.Listener
	conns     map[*conn]struct{}
	suspended chan time.Duration // handed to the accept loop: how long to wait for the resume file
}

func (s *listenState) track(c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conns == nil {
		s.conns = map[*conn]struct{}{}
	}
	s.conns[c] = struct{}{}
}

func (s *listenState) untrack(c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, c)
}

func (a *Agent) suspend(c *conn, req *Request) {
	s := &a.listen
	s.mu.Lock()
	if s.l == nil || s.path == "" {
		s.mu.Unlock()
		c.sendError(req.ID, errf(CodeFailedPrecondition, "suspend needs the agent to listen on a unix socket"))
		return
	}
	wait := time.Duration(req.TimeoutMs) * time.Millisecond
	if wait <= 0 || wait > 10*time.Minute {
		wait = 30 * time.Second
	}
	os.Remove(filepath.Join(filepath.Dir(s.path), resumeFile)) // a stale one would end the suspension at once
	c.send(M{"id": req.ID, "type": "ok"})
	// Connections first, then the listener: once the socket file is gone, no host socket is left.
	for cc := range s.conns {
		cc.close()
	}
	s.conns = nil
	s.suspended <- wait
	s.l.Close() // unlinks the socket; the accept loop waits for the resume file
	s.mu.Unlock()
}

// serveUnix listens on a unix socket and serves each connection concurrently; after a suspend it
// listens again on the same path.
func (a *Agent) serveUnix(path string) error {
	s := &a.listen
	s.suspended = make(chan time.Duration, 1)
	for {
		os.Remove(path)
		l, err := net.Listen("unix", path)
		if err != nil {
			return err
		}
		os.Chmod(path, 0o600)
		warmSpawn.Do(func() { go a.warmSpawnPath() })
		s.mu.Lock()
		s.path, s.l = path, l
		s.mu.Unlock()
		err = a.ServeListener(l)
		var wait time.Duration
		select {
		case wait = <-s.suspended:
		default:
			return err
		}
		resume := filepath.Join(filepath.Dir(path), resumeFile)
		for deadline := time.Now().Add(wait); time.Now().Before(deadline); time.Sleep(2 * time.Millisecond) {
			if _, err := os.Stat(resume); err == nil {
				os.Remove(resume)
				break
			}
		}
	}
}
