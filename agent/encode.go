package main

import (
	"encoding/base64"
	"encoding/json"
	"strconv"
	"unicode/utf8"
)

// appendJSON appends v, as encoding/json would encode it, to b. Outgoing frames are maps of a few
// plain types (strings, integers, booleans, bytes, string lists and nested maps); those are encoded
// here without reflection, anything else by encoding/json. Why not encoding/json for all: in a
// microVM restored from a snapshot every code path is run for the first time under TCG, which
// translates each new block of guest code (~10 µs a block), and encoding/json's reflection walk
// was ~600 of the ~6,600 blocks a fork translates before its agent answers hello (BENCHMARKS.md,
// session 16). Two differences from encoding/json, both still valid JSON that any decoder reads
// the same: map keys are in map order, not sorted, and <, > and & are not escaped.
func appendJSON(b []byte, v any) ([]byte, error) {
	switch x := v.(type) {
	case nil:
		return append(b, "null"...), nil
	case string:
		return appendJSONString(b, x), nil
	case bool:
		return strconv.AppendBool(b, x), nil
	case int:
		return strconv.AppendInt(b, int64(x), 10), nil
	case int64:
		return strconv.AppendInt(b, x, 10), nil
	case int32:
		return strconv.AppendInt(b, int64(x), 10), nil
	case uint32:
		return strconv.AppendUint(b, uint64(x), 10), nil
	case uint64:
		return strconv.AppendUint(b, x, 10), nil
	case []byte:
		if x == nil {
			return append(b, "null"...), nil
		}
		b = append(b, '"')
		b = base64.StdEncoding.AppendEncode(b, x)
		return append(b, '"'), nil
	case []string:
		if x == nil {
			return append(b, "null"...), nil
		}
		b = append(b, '[')
		for i, s := range x {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendJSONString(b, s)
		}
		return append(b, ']'), nil
	case M:
		return appendJSONMap(b, x)
	case map[string]any:
		return appendJSONMap(b, x)
	case []M:
		if x == nil {
			return append(b, "null"...), nil
		}
		b = append(b, '[')
		for i, m := range x {
			if i > 0 {
				b = append(b, ',')
			}
			var err error
			if b, err = appendJSONMap(b, m); err != nil {
				return nil, err
			}
		}
		return append(b, ']'), nil
	default:
		enc, err := json.Marshal(x)
		if err != nil {
			return nil, err
		}
		return append(b, enc...), nil
	}
}

func appendJSONMap(b []byte, m map[string]any) ([]byte, error) {
	if m == nil {
		return append(b, "null"...), nil
	}
	b = append(b, '{')
	first := true
	for k, v := range m {
		if !first {
			b = append(b, ',')
		}
		first = false
		b = appendJSONString(b, k)
		b = append(b, ':')
		var err error
		if b, err = appendJSON(b, v); err != nil {
			return nil, err
		}
	}
	return append(b, '}'), nil
}

// appendJSONString quotes s as a JSON string; invalid UTF-8 becomes U+FFFD, as in encoding/json.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
