package main

import (
	"encoding/base64"
	"encoding/json"
	"math"
	"unicode/utf8"
)

// decodeRequest decodes a request frame as encoding/json would decode it into a Request. Frames as
// the host writes them (flat objects of the fields below, strings without escapes) take a short
// path without reflection; anything else, malformed frames included, goes to encoding/json, which
// also words the errors. Why: in a microVM restored from a snapshot, TCG translates each block of
// guest code the first time it runs (~10 µs a block), and encoding/json's reflection walk was ~450
// of the ~7,000 blocks a fork runs before it answers hello (BENCHMARKS.md, session 16).
func decodeRequest(b []byte, req *Request) error {
	if decodeRequestFast(b, req) {
		return nil
	}
	*req = Request{}
	return json.Unmarshal(b, req)
}

// decodeRequestFast fills req and returns true, or returns false (req then half filled) at the
// first thing it does not handle: a key it does not know by its exact name, an escape or invalid
// UTF-8 in a string, a number that is not a plain integer in range, a nested object other than
// env, anything after the object.
func decodeRequestFast(b []byte, req *Request) bool {
	d := fastDec{b: b}
	if !d.next('{') {
		return false
	}
	if d.next('}') {
		return d.end()
	}
	for {
		key, ok := d.str()
		if !ok || !d.next(':') {
			return false
		}
		d.ws()
		if d.lit("null") { // encoding/json: null leaves a value field alone and sets a pointer, slice or map to nil
			switch key {
			case "args":
				req.Args = nil
			case "env":
				req.Env = nil
			case "uid":
				req.UID = nil
			case "gid":
				req.GID = nil
			case "mode":
				req.Mode = nil
			case "data":
				req.Data = nil
			case "net":
				req.Net = nil
			}
			if !knownKey(key) {
				return false
			}
		} else {
			switch key {
			case "id", "type", "cwd", "proc", "sig", "path", "to", "target":
				s, ok := d.str()
				if !ok {
					return false
				}
				*req.stringField(key) = s
			case "stdin", "tty", "eof", "group", "append", "parents", "recursive", "poweroff":
				v, ok := d.boolean()
				if !ok {
					return false
				}
				*req.boolField(key) = v
			case "offset", "length", "timeoutMs", "epochMs":
				n, ok := d.integer(math.MinInt64, math.MaxInt64)
				if !ok {
					return false
				}
				*req.int64Field(key) = n
			case "cols", "rows":
				n, ok := d.integer(0, math.MaxUint16)
				if !ok {
					return false
				}
				if key == "cols" {
					req.Cols = uint16(n)
				} else {
					req.Rows = uint16(n)
				}
			case "uid", "gid", "mode":
				n, ok := d.integer(0, math.MaxUint32)
				if !ok {
					return false
				}
				v := uint32(n)
				switch key {
				case "uid":
					req.UID = &v
				case "gid":
					req.GID = &v
				default:
					req.Mode = &v
				}
			case "args":
				args, ok := d.strings()
				if !ok {
					return false
				}
				req.Args = args
			case "env":
				if req.Env != nil { // encoding/json would merge a second "env" into the first
					return false
				}
				env, ok := d.stringMap()
				if !ok {
					return false
				}
				req.Env = env
			case "data":
				s, ok := d.str()
				if !ok {
					return false
				}
				data, err := base64.StdEncoding.DecodeString(s)
				if err != nil {
					return false
				}
				req.Data = data
			default: // "net" (a nested object) and any other key
				return false
			}
		}
		if d.next('}') {
			return d.end()
		}
		if !d.next(',') {
			return false
		}
	}
}

func knownKey(k string) bool {
	switch k {
	case "id", "type", "cwd", "proc", "sig", "path", "to", "target", "stdin", "tty", "eof", "group", "append",
		"parents", "recursive", "poweroff", "offset", "length", "timeoutMs", "epochMs", "cols", "rows", "uid",
		"gid", "mode", "args", "env", "data", "net":
		return true
	}
	return false
}

func (r *Request) stringField(k string) *string {
	switch k {
	case "id":
		return &r.ID
	case "type":
		return &r.Type
	case "cwd":
		return &r.Cwd
	case "proc":
		return &r.Proc
	case "sig":
		return &r.Sig
	case "path":
		return &r.Path
	case "to":
		return &r.To
	default:
		return &r.Target
	}
}

func (r *Request) boolField(k string) *bool {
	switch k {
	case "stdin":
		return &r.Stdin
	case "tty":
		return &r.TTY
	case "eof":
		return &r.EOF
	case "group":
		return &r.Group
	case "append":
		return &r.Append
	case "parents":
		return &r.Parents
	case "recursive":
		return &r.Recursive
	default:
		return &r.Poweroff
	}
}

func (r *Request) int64Field(k string) *int64 {
	switch k {
	case "offset":
		return &r.Offset
	case "length":
		return &r.Length
	case "timeoutMs":
		return &r.TimeoutMs
	default:
		return &r.EpochMs
	}
}

// fastDec reads the subset of JSON that decodeRequestFast accepts.
type fastDec struct {
	b []byte
	i int
}

func (d *fastDec) ws() {
	for d.i < len(d.b) {
		switch d.b[d.i] {
		case ' ', '\t', '\n', '\r':
			d.i++
		default:
			return
		}
	}
}

// next skips white space and consumes c if it comes next.
func (d *fastDec) next(c byte) bool {
	d.ws()
	if d.i < len(d.b) && d.b[d.i] == c {
		d.i++
		return true
	}
	return false
}

func (d *fastDec) end() bool {
	d.ws()
	return d.i == len(d.b)
}

func (d *fastDec) lit(w string) bool {
	if len(d.b)-d.i >= len(w) && string(d.b[d.i:d.i+len(w)]) == w {
		d.i += len(w)
		return true
	}
	return false
}

func (d *fastDec) boolean() (bool, bool) {
	if d.lit("true") {
		return true, true
	}
	if d.lit("false") {
		return false, true
	}
	return false, false
}

// str reads a string without escapes, control characters or invalid UTF-8.
func (d *fastDec) str() (string, bool) {
	if !d.next('"') {
		return "", false
	}
	start := d.i
	for d.i < len(d.b) {
		c := d.b[d.i]
		switch {
		case c == '"':
			s := d.b[start:d.i]
			d.i++
			if !utf8.Valid(s) {
				return "", false
			}
			return string(s), true
		case c == '\\' || c < 0x20:
			return "", false
		}
		d.i++
	}
	return "", false
}

// integer reads a JSON integer (no fraction or exponent) within [lo, hi].
func (d *fastDec) integer(lo, hi int64) (int64, bool) {
	d.ws()
	neg := d.i < len(d.b) && d.b[d.i] == '-'
	if neg {
		d.i++
	}
	start := d.i
	var n uint64
	for d.i < len(d.b) && d.b[d.i] >= '0' && d.b[d.i] <= '9' {
		if n > (math.MaxUint64-9)/10 {
			return 0, false
		}
		n = n*10 + uint64(d.b[d.i]-'0')
		d.i++
	}
	digits := d.i - start
	if digits == 0 || (digits > 1 && d.b[start] == '0') {
		return 0, false
	}
	if d.i < len(d.b) && (d.b[d.i] == '.' || d.b[d.i] == 'e' || d.b[d.i] == 'E') {
		return 0, false
	}
	var v int64
	switch {
	case !neg && n <= math.MaxInt64:
		v = int64(n)
	case neg && n <= math.MaxInt64:
		v = -int64(n)
	case neg && n == math.MaxInt64+1:
		v = math.MinInt64
	default:
		return 0, false
	}
	if v < lo || v > hi {
		return 0, false
	}
	return v, true
}

func (d *fastDec) strings() ([]string, bool) {
	if !d.next('[') {
		return nil, false
	}
	out := []string{}
	if d.next(']') {
		return out, true
	}
	for {
		s, ok := d.str()
		if !ok {
			return nil, false
		}
		out = append(out, s)
		if d.next(']') {
			return out, true
		}
		if !d.next(',') {
			return nil, false
		}
	}
}

func (d *fastDec) stringMap() (map[string]string, bool) {
	if !d.next('{') {
		return nil, false
	}
	out := map[string]string{}
	if d.next('}') {
		return out, true
	}
	for {
		k, ok := d.str()
		if !ok || !d.next(':') {
			return nil, false
		}
		v, ok := d.str()
		if !ok {
			return nil, false
		}
		out[k] = v
		if d.next('}') {
			return out, true
		}
		if !d.next(',') {
			return nil, false
		}
	}
}
