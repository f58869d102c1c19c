package main

import (
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestSuspendAndResumeListening(t *testing.T) {
	r, err := OpenRoot("/")
	if err != nil {
		t.Fatal(err)
	}
	a := NewAgent(r, false, false)
	dir := t.TempDir()
	sock := filepath.Join(dir, "agent.sock")
	go a.serveUnix(sock)
	var cl *client
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			cl = dial(t, sock)
			break
		}
		if i > 500 {
			t.Fatal("no socket")
		}
		time.Sleep(2 * time.Millisecond)
	}
	id := cl.send(M{"type": "run", "args": []string{"sleep", "30"}})
	cl.next(id)
	if f := cl.do(M{"type": "suspend", "timeoutMs": 20000}); f.Type() != "ok" {
		t.Fatalf("suspend: %v", f)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(sock); os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the socket is still there after suspend")
		}
		time.Sleep(2 * time.Millisecond)
	}
	if _, err := net.Dial("unix", sock); err == nil {
		t.Fatal("connected while suspended")
	}
	must(t, os.WriteFile(filepath.Join(dir, resumeFile), nil, 0o600))
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if i > 1000 {
			t.Fatal("not listening again after the resume file appeared")
		}
		time.Sleep(2 * time.Millisecond)
	}
	cl2 := dial(t, sock)
	list := cl2.mustOK(M{"type": "list"})
	if ps, _ := list["processes"].([]any); len(ps) != 1 {
		t.Fatalf("processes survive a suspension: %v", list)
	}
	cl2.mustOK(M{"type": "signal", "proc": id, "sig": "KILL"})
	if _, err := os.Stat(filepath.Join(dir, resumeFile)); !os.IsNotExist(err) {
		t.Fatal("the resume file was not consumed")
	}
}
