package main

import (
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
)

// ProtocolVersion is the wire protocol version announced by hello.
const ProtocolVersion = 1

// MaxFrame is the largest JSON payload (excluding the 4-byte length) either side may send.
const MaxFrame = 1 << 20

// Error codes carried by "error" frames.
const (
	CodeInvalidArgument    = "invalid_argument"
	CodeNotFound           = "not_found"
	CodePermissionDenied   = "permission_denied"
	CodeFailedPrecondition = "failed_precondition"
	CodeInternal           = "internal"
)

// Request is the union of every request's fields; each type reads the fields it needs.
type Request struct {
	ID   string `json:"id"`
	Type string `json:"type"`

	// run
	Args  []string          `json:"args"`
	Env   map[string]string `json:"env"`
	Cwd   string            `json:"cwd"`
	UID   *uint32           `json:"uid"`
	GID   *uint32           `json:"gid"`
	Stdin bool              `json:"stdin"`
	TTY   bool              `json:"tty"`
	Cols  uint16            `json:"cols"` // run with tty, resize
	Rows  uint16            `json:"rows"`

	// stdin, signal
	Proc  string `json:"proc"`
	Data  []byte `json:"data"`
	EOF   bool   `json:"eof"`
	Sig   string `json:"sig"`
	Group bool   `json:"group"`

	// file.*
	Path      string  `json:"path"`
	To        string  `json:"to"`
	Offset    int64   `json:"offset"`
	Length    int64   `json:"length"`
	Append    bool    `json:"append"`
	Mode      *uint32 `json:"mode"`
	Parents   bool    `json:"parents"`
	Recursive bool    `json:"recursive"`

	// cancel
	Target string `json:"target"`

	// shutdown
	Poweroff bool `json:"poweroff"`

	// net.configure (VM mode: a VM restored from an older snapshot takes over the fixed address)
	Net *netConfig `json:"net"`

	// suspend
	TimeoutMs int64 `json:"timeoutMs"`

	// hello, net.configure (VM mode): the host's time when it sent the request, in ms since the
	// epoch; a guest clock behind it is stepped forward to it (stepClockForward).
	EpochMs int64 `json:"epochMs"`
}

// M is an outgoing frame.
type M map[string]any

// Error is a protocol error with a code.
type Error struct {
	Code    string
	Message string
}

func (e *Error) Error() string { return e.Code + ": " + e.Message }

func errf(code, format string, a ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, a...)}
}

var errFrameTooLarge = errors.New("frame too large")

// readFrame reads one frame's payload. It returns errFrameTooLarge without
// consuming the payload when the announced length exceeds MaxFrame.
func readFrame(r io.Reader) ([]byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > MaxFrame {
		return nil, errFrameTooLarge
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(r, buf); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return buf, nil
}

// conn is one client connection; send is safe for concurrent use.
type conn struct {
	rw      io.ReadWriteCloser
	mu      sync.Mutex // serialises writes so frames never interleave
	closed  atomic.Bool
	cancels cancels // long-running requests (watches) that "cancel" can end
}

func (c *conn) send(m M) error {
	buf, err := appendJSONMap(make([]byte, 4, 256), m) // (4: the length, written by write)
	if err != nil {
		return err
	}
	return c.write(buf)
}

// sendData sends {"id":…,"type":…,"data":…} (data in base64, as encoding/json writes bytes), the
// frame of a process's output, without building a map. The pump that sends it is a new goroutine
// for each command, with Go's smallest stack: through send and its map walk it outgrew that stack
// at its first frame, and copying a stack is ~280 blocks of Go runtime for TCG to translate in a
// microVM forked from a snapshot (BENCHMARKS.md, session 16).
func (c *conn) sendData(id, typ string, data []byte) error {
	buf := make([]byte, 4, 40+len(id)+len(typ)+base64.StdEncoding.EncodedLen(len(data)))
	buf = append(buf, `{"id":`...)
	buf = appendJSONString(buf, id)
	buf = append(buf, `,"type":`...)
	buf = appendJSONString(buf, typ)
	buf = append(buf, `,"data":"`...)
	buf = base64.StdEncoding.AppendEncode(buf, data)
	buf = append(buf, `"}`...)
	return c.write(buf)
}

// write sends a frame whose payload follows 4 bytes left for its length.
func (c *conn) write(buf []byte) error {
	if n := len(buf) - 4; n > MaxFrame {
		return fmt.Errorf("outgoing frame of %d bytes exceeds the limit", n)
	}
	binary.BigEndian.PutUint32(buf, uint32(len(buf)-4))
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed.Load() {
		return io.ErrClosedPipe
	}
	_, err := c.rw.Write(buf)
	return err
}

func (c *conn) sendError(id string, err error) {
	var e *Error
	if !errors.As(err, &e) {
		e = errnoError(err)
	}
	c.send(M{"id": id, "type": "error", "code": e.Code, "message": e.Message})
}

func (c *conn) close() {
	if c.closed.CompareAndSwap(false, true) {
		c.rw.Close() // also unblocks a send stuck in Write
		c.cancels.all()
	}
}
