// settle: the guest finishes the work it has queued before its VM is snapshotted.
package main

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// settleMaxWait bounds how long settle waits for links (a link whose carrier never comes up stays
// "down" for good; the snapshot is taken anyway).
const settleMaxWait = 2 * time.Second

// settle makes a VM about to be snapshotted quiet, so that the snapshot's forks do not each do what
// the VM had queued: under TCG every code path a fork runs is translated afresh in its new QEMU
// (BENCHMARKS.md, microvm-restore-notes).
//   - Dirty pages are written (sync): else each fork's writeback would write the same data again.
//   - A link that came up is announced by the kernel's link watcher up to a second later (its
//     operstate stays "down" until then): a VM snapshotted in its first second left that to every
//     fork, ~450 code blocks of netdev notifiers and netlink messages, and an eth0 whose
//     operstate read "down" in the fork's first command.
//
// It answers what it waited for.
func settle(sysNet string, maxWait time.Duration) M {
	t0 := time.Now()
	unix.Sync()
	deadline := t0.Add(maxWait)
	var pending []string
	for {
		pending = unannouncedLinks(sysNet)
		if len(pending) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	m := M{"waitedMs": time.Since(t0).Milliseconds()}
	if len(pending) > 0 {
		m["unannounced"] = pending
	}
	return m
}

// unannouncedLinks lists the links that are up with a carrier but whose operstate the link watcher
// has not set yet ("down"). (lo's is always "unknown".)
func unannouncedLinks(sysNet string) []string {
	entries, err := os.ReadDir(sysNet)
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range entries {
		dir := filepath.Join(sysNet, e.Name())
		flags, err1 := readTrimmed(filepath.Join(dir, "flags"))
		carrier, err2 := readTrimmed(filepath.Join(dir, "carrier")) // (unreadable while the link is down)
		state, err3 := readTrimmed(filepath.Join(dir, "operstate"))
		if err1 != nil || err2 != nil || err3 != nil {
			continue
		}
		f, err := strconv.ParseUint(strings.TrimPrefix(flags, "0x"), 16, 32)
		if err != nil || f&unix.IFF_UP == 0 || f&unix.IFF_LOOPBACK != 0 {
			continue
		}
		if carrier == "1" && state == "down" {
			out = append(out, e.Name())
		}
	}
	return out
}

func readTrimmed(path string) (string, error) {
	b, err := os.ReadFile(path)
	return strings.TrimSpace(string(b)), err
}
