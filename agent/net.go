// Guest networking for VM mode: the host hands the VM its address (the same link-local one in
// every VM; the task's namespace NATs it to the task's project address, src/drivers/microvm VM_NET),
// and the agent configures the guest's eth0: MAC, address, default route, resolv.conf and hosts.
// Done with rtnetlink directly (the guest has no iproute2); the stdlib has no API for it.
package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// netConfig is the "net" field of the VM config, and the body of a "net.configure" request
// (a VM restored from a snapshot taken before the fixed address takes it over).
type netConfig struct {
	IP         string `json:"ip"`
	Prefix     int    `json:"prefix"`
	Gateway    string `json:"gateway"`
	MAC        string `json:"mac"`
	ResolvConf string `json:"resolvConf"`
	Hosts      string `json:"hosts"`
}

// configureNetwork sets up lo and eth0 and writes /etc/resolv.conf and /etc/hosts under root.
func configureNetwork(c *netConfig, root string) error {
	ip := net.ParseIP(c.IP).To4()
	gw := net.ParseIP(c.Gateway).To4()
	mac, err := net.ParseMAC(c.MAC)
	if ip == nil || gw == nil || err != nil || c.Prefix < 1 || c.Prefix > 30 {
		return errf(CodeInvalidArgument, "bad network config %+v", *c)
	}
	if lo, err := net.InterfaceByName("lo"); err == nil && lo.Flags&net.FlagUp == 0 { // (a restored VM's is up)
		if err := setLink(lo.Index, nil, true); err != nil {
			return fmt.Errorf("lo up: %w", err)
		}
	}
	var eth *net.Interface
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if eth, err = net.InterfaceByName("eth0"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no eth0 in the guest: %w", err)
		}
	}
	// No IPv6 on eth0 (lo keeps ::1): Berth's networks are IPv4 only (Docker, too, turns IPv6 off on a
	// container's interface on an IPv4-only network). Otherwise the link's coming up starts IPv6 autoconfiguration
	// (a link-local address, duplicate address detection, router solicitations, MLD reports): packets
	// no one answers, and timers a VM snapshotted in its first seconds leaves to every fork, where
	// they run cold under TCG (~1300 of the ~12700 code blocks QEMU translated before a fork's agent
	// answered; BENCHMARKS.md, session 12). (Absent when the kernel has no IPv6.)
	if err := os.WriteFile("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", []byte("1"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("eth0 without IPv6: %w", err)
	}
	// The MAC changes with the link up where the NIC allows it (virtio-net does, by a control-queue
	// command), else with the link down. Up, a restored guest skips taking the link down and up
	// again (qdiscs, IPv6 address and multicast list rebuilt: code a restored TCG guest runs cold).
	// Then a restored VM drops its old address.
	if err := setLink(eth.Index, mac, true); err != nil {
		if err := setLink(eth.Index, nil, false); err != nil {
			return fmt.Errorf("eth0 down: %w", err)
		}
		if err := setLink(eth.Index, mac, true); err != nil {
			return fmt.Errorf("eth0 mac/up: %w", err)
		}
	}
	if addrs, _ := eth.Addrs(); len(addrs) > 0 {
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil && !n.IP.Equal(ip) {
				ones, _ := n.Mask.Size()
				nlAddr(unix.RTM_DELADDR, 0, eth.Index, n.IP.To4(), ones)
			}
		}
	}
	if err := nlAddr(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, eth.Index, ip, c.Prefix); err != nil {
		return fmt.Errorf("eth0 address: %w", err)
	}
	if err := nlDefaultRoute(eth.Index, gw); err != nil {
		return fmt.Errorf("default route: %w", err)
	}
	for name, text := range map[string]string{"resolv.conf": c.ResolvConf, "hosts": c.Hosts} {
		if text == "" {
			continue
		}
		p := filepath.Join(root, "etc", name)
		if fi, err := os.Lstat(p); err == nil && fi.Mode().IsRegular() {
			if old, err := os.ReadFile(p); err == nil && string(old) == text {
				continue // a restored VM's resolv.conf, when its network is the snapshot's
			}
		}
		os.MkdirAll(filepath.Dir(p), 0o755)
		os.Remove(p) // an image's symlink is replaced, not followed
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			return err
		}
	}
	return nil
}

func rtattr(typ uint16, data []byte) []byte {
	l := 4 + len(data)
	b := make([]byte, (l+3)&^3)
	binary.LittleEndian.PutUint16(b[0:], uint16(l))
	binary.LittleEndian.PutUint16(b[2:], typ)
	copy(b[4:], data)
	return b
}

// nlRequest sends one rtnetlink request and waits for its acknowledgement.
func nlRequest(typ, flags uint16, body []byte) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	msg := make([]byte, unix.NLMSG_HDRLEN, unix.NLMSG_HDRLEN+len(body))
	binary.LittleEndian.PutUint32(msg[0:], uint32(unix.NLMSG_HDRLEN+len(body)))
	binary.LittleEndian.PutUint16(msg[4:], typ)
	binary.LittleEndian.PutUint16(msg[6:], flags|unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	binary.LittleEndian.PutUint32(msg[8:], 1)
	msg = append(msg, body...)
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	buf := make([]byte, 8192)
	n, _, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		return err
	}
	if n >= unix.NLMSG_HDRLEN+4 && binary.LittleEndian.Uint16(buf[4:]) == unix.NLMSG_ERROR {
		if code := int32(binary.LittleEndian.Uint32(buf[unix.NLMSG_HDRLEN:])); code != 0 {
			return unix.Errno(-code)
		}
		return nil
	}
	return fmt.Errorf("unexpected netlink reply")
}

// setLink sets the link's MAC (when given) and its up/down state.
func setLink(index int, mac net.HardwareAddr, up bool) error {
	body := make([]byte, 16) // ifinfomsg
	body[0] = unix.AF_UNSPEC
	binary.LittleEndian.PutUint32(body[4:], uint32(index))
	if up {
		binary.LittleEndian.PutUint32(body[8:], unix.IFF_UP)
	}
	binary.LittleEndian.PutUint32(body[12:], unix.IFF_UP) // change mask
	if mac != nil {
		body = append(body, rtattr(unix.IFLA_ADDRESS, mac)...)
	}
	return nlRequest(unix.RTM_NEWLINK, 0, body)
}

func nlAddr(typ uint16, flags uint16, index int, ip net.IP, prefix int) error {
	body := make([]byte, 8) // ifaddrmsg
	body[0] = unix.AF_INET
	body[1] = byte(prefix)
	binary.LittleEndian.PutUint32(body[4:], uint32(index))
	body = append(body, rtattr(unix.IFA_LOCAL, ip)...)
	body = append(body, rtattr(unix.IFA_ADDRESS, ip)...)
	return nlRequest(typ, flags, body)
}

func nlDefaultRoute(index int, gw net.IP) error {
	body := make([]byte, 12) // rtmsg
	body[0] = unix.AF_INET
	body[4] = unix.RT_TABLE_MAIN
	body[5] = unix.RTPROT_BOOT
	body[6] = unix.RT_SCOPE_UNIVERSE
	body[7] = unix.RTN_UNICAST
	oif := make([]byte, 4)
	binary.LittleEndian.PutUint32(oif, uint32(index))
	body = append(body, rtattr(unix.RTA_GATEWAY, gw)...)
	body = append(body, rtattr(unix.RTA_OIF, oif)...)
	return nlRequest(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, body)
}
