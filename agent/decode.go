package main

import (
	"encoding/base64"
	"encoding/json"
	"math"
	"unicode/utf8"
)

// decodeRequest decodes a request frame as encoding/json would decode it into a Request. Frames as
// the host writes them (flat objects of Request's fields, strings without escapes) take a short
// path without reflection; anything else, malformed frames included, goes to encoding/json, which
// also words the errors. Why: in a microVM restored from a snapshot, TCG translates each block of
// guest code the first time it runs (~10 µs a block), and encoding/json's reflection walk was ~400
// of the ~6,500 blocks a fork runs before it answers hello (BENCHMARKS.md, session 16).
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
		if !d.field(req.field(key)) {
			return false
		}
		if d.next('}') {
			return d.end()
		}
		if !d.next(',') {
			return false
		}
	}
}

// field reads one value into p, a pointer to a Request field (nil: an unknown key).
func (d *fastDec) field(p any) bool {
	if d.lit("null") { // encoding/json: null leaves a value alone and sets a pointer, slice or map to nil
		switch p := p.(type) {
		case nil:
			return false
		case **uint32:
			*p = nil
		case *[]string:
			*p = nil
		case *map[string]string:
			*p = nil
		case *[]byte:
			*p = nil
		case **netConfig:
			*p = nil
		}
		return true
	}
	switch p := p.(type) {
	case *string:
		s, ok := d.str()
		*p = s
		return ok
	case *bool:
		v, ok := d.boolean()
		*p = v
		return ok
	case *int64:
		n, ok := d.integer(math.MinInt64, math.MaxInt64)
		*p = n
		return ok
	case *uint16:
		n, ok := d.integer(0, math.MaxUint16)
		*p = uint16(n)
		return ok
	case **uint32:
		n, ok := d.integer(0, math.MaxUint32)
		v := uint32(n)
		*p = &v
		return ok
	case *[]string:
		args, ok := d.strings()
		*p = args
		return ok
	case *map[string]string:
		if *p != nil { // encoding/json would merge a second "env" into the first
			return false
		}
		env, ok := d.stringMap()
		*p = env
		return ok
	case *[]byte:
		s, ok := d.str()
		if !ok {
			return false
		}
		data, err := base64.StdEncoding.DecodeString(s)
		*p = data
		return err == nil
	default: // **netConfig (a nested object), nil (a key the short path does not know)
		return false
	}
}

// field is a pointer to the field that key names exactly, or nil.
func (r *Request) field(key string) any {
	switch key {
	case "id":
		return &r.ID
	case "type":
		return &r.Type
	case "args":
		return &r.Args
	case "env":
		return &r.Env
	case "cwd":
		return &r.Cwd
	case "uid":
		return &r.UID
	case "gid":
		return &r.GID
	case "stdin":
		return &r.Stdin
	case "tty":
		return &r.TTY
	case "cols":
		return &r.Cols
	case "rows":
		return &r.Rows
	case "proc":
		return &r.Proc
	case "data":
		return &r.Data
	case "eof":
		return &r.EOF
	case "sig":
		return &r.Sig
	case "group":
		return &r.Group
	case "path":
		return &r.Path
	case "to":
		return &r.To
	case "offset":
		return &r.Offset
	case "length":
		return &r.Length
	case "append":
		return &r.Append
	case "mode":
		return &r.Mode
	case "parents":
		return &r.Parents
	case "recursive":
		return &r.Recursive
	case "target":
		return &r.Target
	case "poweroff":
		return &r.Poweroff
	case "net":
		return &r.Net
	case "timeoutMs":
		return &r.TimeoutMs
	case "epochMs":
		return &r.EpochMs
	}
	return nil
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
