package main

import (
	"encoding/json"
	"reflect"
	"testing"
)

// appendJSON must mean what encoding/json's encoding means: both decode to the same value.
func TestAppendJSONMatchesEncodingJSON(t *testing.T) {
	type st struct {
		A int    `json:"a"`
		B string `json:"b,omitempty"`
	}
	for i, v := range []any{
		M{},
		M{"id": "r1", "type": "started", "pid": 42},
		M{"id": "x", "type": "stdout", "data": []byte{0, 1, 2, 0xff, 'h', 'i'}},
		M{"data": []byte{}, "nil": []byte(nil), "none": nil, "list": []string(nil), "empty": []string{}},
		M{"s": "quote \" backslash \\ newline \n cr \r tab \t nul \x00 bell \x07 esc \x1b del \x7f"},
		M{"s": "invalid \xff\xfe utf-8, truncated \xe2\x82, fine é € 😀 \u2028 <a&b>"},
		M{"n": int64(-1 << 62), "u": uint64(1 << 63), "u32": uint32(4000000000), "i32": int32(-7), "t": true, "f": false},
		M{"nested": M{"deeper": map[string]any{"caps": []string{"run", "tty"}}}, "procs": []M{{"id": "a"}, {"id": "b", "args": []string{"sh", "-c", "echo \"hi\""}}}},
		M{"procs": []M(nil), "m": M(nil)},
		M{"struct": st{A: 1}, "ptr": &st{A: 2, B: "x"}, "float": 1.5e300, "floats": []float64{0.1, 2}},
	} {
		got, err := appendJSON(nil, v)
		if err != nil {
			t.Fatalf("%d: %v", i, err)
		}
		if !json.Valid(got) {
			t.Fatalf("%d: not valid JSON: %s", i, got)
		}
		want, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		var g, w any
		if err := json.Unmarshal(got, &g); err != nil {
			t.Fatal(err)
		}
		json.Unmarshal(want, &w)
		if !reflect.DeepEqual(g, w) {
			t.Errorf("%d: appendJSON gave %s\nencoding/json gave %s", i, got, want)
		}
	}
}

func TestAppendJSONFallbackError(t *testing.T) {
	if _, err := appendJSON(nil, M{"ch": make(chan int)}); err == nil {
		t.Fatal("a value encoding/json cannot encode must be an error, not a frame")
	}
}
