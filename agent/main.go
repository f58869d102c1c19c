// Command berth-agent is Berth's guest agent: it runs workloads, relays their
// output and exit status, and serves files, over the framed protocol described
// in PROTOCOL.md.
package main

import (
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"strings"

	"golang.org/x/sys/unix"
)

const defaultVport = "/dev/virtio-ports/agent"

func main() {
	if isVMInit() {
		vmMain()
		return
	}
	if len(os.Args) > 1 && os.Args[1] == "monitor" {
		monitorMain(os.Args[2:])
		return
	}
	listen := flag.String("listen", "", "unix:/path | stdio | vport:/dev/vport0p1 (default: vport:"+defaultVport+" if it exists, else stdio)")
	rootDir := flag.String("root", "/", "directory that file paths resolve in and that processes are chrooted to (when not /)")
	poweroff := flag.Bool("poweroff", false, "let shutdown{poweroff:true} power the machine off even when not PID 1")
	reaper := flag.Bool("reaper", false, "become a child subreaper and reap orphans (always on as PID 1)")
	version := flag.Bool("version", false, "print the version and exit")
	connFD := flag.Int("conn-fd", -1, "an inherited, already connected socket to serve as one more connection (besides --listen): the host's first connection, made before the agent ran")
	flag.Parse()
	log.SetPrefix("berth-agent: ")
	if *version {
		fmt.Println("berth-agent/" + Version)
		return
	}
	if *listen == "" {
		*listen = "stdio"
		if _, err := os.Stat(defaultVport); err == nil {
			*listen = "vport:" + defaultVport
		}
	}
	pid1 := os.Getpid() == 1
	if pid1 {
		// Signals with the default action would make the Go runtime exit, and
		// PID 1 exiting panics the kernel. Catch them (caught, not ignored, so
		// children still get default dispositions).
		ch := make(chan os.Signal, 4)
		signal.Notify(ch, unix.SIGTERM, unix.SIGINT, unix.SIGHUP, unix.SIGPIPE)
		go func() {
			for s := range ch {
				log.Printf("ignoring %v", s)
			}
		}()
	} else if *reaper {
		if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
			log.Fatalf("PR_SET_CHILD_SUBREAPER: %v", err)
		}
	}
	root, err := OpenRoot(*rootDir)
	if err != nil {
		log.Fatalf("--root: %v", err)
	}
	a := NewAgent(root, pid1 || *reaper, *poweroff)
	if *connFD >= 0 {
		// Not inherited by the processes the agent starts (they must not talk to the host as the agent).
		unix.CloseOnExec(*connFD)
		go a.Serve(os.NewFile(uintptr(*connFD), "host"))
	}
	if err := a.Listen(*listen); err != nil {
		log.Fatal(err)
	}
}

type stdio struct {
	io.Reader
	io.Writer
}

func (stdio) Close() error { return os.Stdin.Close() }

// Listen serves the given endpoint until it fails (or, for stdio, until EOF).
func (a *Agent) Listen(spec string) error {
	switch {
	case spec == "stdio":
		a.Serve(stdio{os.Stdin, os.Stdout})
		return nil
	case strings.HasPrefix(spec, "unix:"):
		return a.serveUnix(strings.TrimPrefix(spec, "unix:"))
	case strings.HasPrefix(spec, "vport:"):
		return a.serveVport(strings.TrimPrefix(spec, "vport:"))
	}
	return fmt.Errorf("--listen %q: want unix:/path, stdio or vport:/dev/...", spec)
}

// ServeListener serves each accepted connection concurrently.
func (a *Agent) ServeListener(l net.Listener) error {
	for {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		go a.Serve(c)
	}
}
