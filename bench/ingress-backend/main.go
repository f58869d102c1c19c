// A tiny HTTP server, the kind of replica a user runs behind the ingress: the baseline of
// bench/ingress.ts. Usage: ingress-backend 127.0.0.1:0 (prints the bound address on stdout).
package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
)

func main() {
	ln, err := net.Listen("tcp", os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(ln.Addr().String())
	body := []byte("hello from the backend\n")
	http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		w.Write(body)
	}))
}
