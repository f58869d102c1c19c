package main

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

var decodeSeeds = []string{
	`{"id":"h1","type":"hello","epochMs":1795878062013}`,
	`{"id":"r1","type":"run","args":["echo","hi"],"env":{"A":"1","PATH":"/bin"},"cwd":"/tmp","stdin":true,"tty":false,"cols":80,"rows":24}`,
	` { "id" : "r2" , "type" : "run" , "args" : [ ] , "env" : { } , "uid" : 0 , "gid" : 4294967295 } `,
	`{"id":"s","type":"stdin","proc":"r1","data":"aGVsbG8=","eof":true}`,
	`{"id":"s","type":"stdin","proc":"r1","data":""}`,
	`{"id":"f","type":"file.write","path":"/a","offset":-5,"length":9223372036854775807,"append":true,"mode":420,"parents":true}`,
	`{"id":"k","type":"signal","proc":"r1","sig":"TERM","group":true}`,
	`{"id":"x","type":"shutdown","poweroff":true,"timeoutMs":-9223372036854775808}`,
	`{"id":"n","args":null,"env":null,"uid":null,"data":null,"cwd":null,"stdin":null,"mode":null,"net":null}`,
	`{"id":"d","id":"dup","args":["a"],"args":["b","c"]}`,
	`{"id":"e","env":{"A":"1"},"env":{"B":"2"}}`,
	`{"id":"u","args":["é €","😀"]}`,
	`{"id":"esc","args":["sh","-c","echo \"hi\"\n"]}`,
	`{"id":"ctl","args":["a` + "\t" + `b"]}`,
	`{"id":"bad-utf8","args":["` + "\xff" + `"]}`,
	`{"ID":"case","Type":"hello"}`,
	`{"id":"unknown","type":"hello","extra":{"x":[1,2]}}`,
	`{"id":"net","type":"net.configure","net":{"address":"10.0.0.2/24"}}`,
	`{"id":"num","offset":1.0}`, `{"id":"num","offset":1e3}`, `{"id":"num","offset":01}`, `{"id":"num","offset":-0}`,
	`{"id":"range","cols":65536}`, `{"id":"range","uid":-1}`, `{"id":"range","offset":9223372036854775808}`,
	`{"id":"type","stdin":"true"}`, `{"id":"type","args":"echo"}`, `{"id":"type","args":[1]}`, `{"id":"b64","data":"!!"}`,
	`{"id":"trail"} x`, `{"id":"trail",}`, `{"id" "x"}`, `{"id":"open"`, `[]`, `null`, ``, `{}`, `{"id":"x"}{}`,
}

// The short path must decode exactly what encoding/json decodes, and fail (handing the frame to
// encoding/json) wherever encoding/json fails.
func checkDecode(t *testing.T, in []byte) {
	var fast Request
	fastOK := decodeRequestFast(in, &fast)
	var want Request
	wantErr := json.Unmarshal(in, &want)
	if fastOK && wantErr != nil {
		t.Fatalf("%q: the short path accepted a frame encoding/json rejects (%v)", in, wantErr)
	}
	if fastOK && !reflect.DeepEqual(fast, want) {
		t.Fatalf("%q: short path %+v, encoding/json %+v", in, fast, want)
	}
	var got Request
	err := decodeRequest(in, &got)
	if (err != nil) != (wantErr != nil) || !reflect.DeepEqual(got, want) {
		t.Fatalf("%q: decodeRequest = %+v, %v; encoding/json = %+v, %v", in, got, err, want, wantErr)
	}
}

func TestDecodeRequestMatchesEncodingJSON(t *testing.T) {
	fast := 0
	for _, s := range decodeSeeds {
		checkDecode(t, []byte(s))
		var r Request
		if decodeRequestFast([]byte(s), &r) {
			fast++
		}
	}
	// The frames the host writes take the short path (the first eleven seeds, the merged env aside).
	for _, s := range decodeSeeds[:10] {
		var r Request
		if !decodeRequestFast([]byte(s), &r) {
			t.Errorf("%s: not decoded on the short path", s)
		}
	}
	t.Logf("%d of %d seeds on the short path", fast, len(decodeSeeds))
}

func FuzzDecodeRequest(f *testing.F) {
	for _, s := range decodeSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(checkDecode)
}

// Every field of Request has its key on the short path, pointing at that field (a field added
// without one would still decode, through encoding/json, only slower).
func TestRequestFieldCoversEveryField(t *testing.T) {
	var r Request
	rv := reflect.ValueOf(&r).Elem()
	for i := 0; i < rv.NumField(); i++ {
		key := strings.Split(rv.Type().Field(i).Tag.Get("json"), ",")[0]
		p := r.field(key)
		if p == nil {
			t.Errorf("no short-path key for %s (%q)", rv.Type().Field(i).Name, key)
			continue
		}
		if reflect.ValueOf(p).Pointer() != rv.Field(i).Addr().Pointer() {
			t.Errorf("key %q points at another field than %s", key, rv.Type().Field(i).Name)
		}
	}
	if r.field("Args") != nil || r.field("extra") != nil {
		t.Error("keys are matched exactly; others go to encoding/json")
	}
}
