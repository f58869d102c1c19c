package main

import (
	"strings"
	"testing"
)

func TestMonitorAgentFDPass(t *testing.T) {
	base := []string{"-c", "id", "-r", "/usr/bin/runsc", "-b", "/b", "-p", "/b/ctr.pid", "-l", "k8s-file:/b/log", "--exit-dir", "/e"}
	m, err := parseMonitorArgs(append(append([]string{}, base...), "--run", "--agent-fd", "4", "--agent-fd-pass"))
	if err != nil || !m.agentFDPass || m.agentFD != 4 || !m.run {
		t.Fatalf("--run --agent-fd 4 --agent-fd-pass: %+v, %v", m, err)
	}
	for _, bad := range [][]string{
		{"--agent-fd", "4", "--agent-fd-pass"},                      // runsc create has no --pass-fd
		{"--run", "--agent-fd-pass"},                                // nothing to pass
		{"--restore", "/img", "--agent-fd", "4", "--agent-fd-pass"}, // restore: not with run
	} {
		if _, err := parseMonitorArgs(append(append([]string{}, base...), bad...)); err == nil || !strings.Contains(err.Error(), "--agent-fd-pass needs") {
			t.Errorf("%v: want the --agent-fd-pass error, got %v", bad, err)
		}
	}
}
