package fakeinet

import (
	"errors"
	"io"
	"net/http"
	"net/netip"
	"os"
	"testing"
)

// TestStart (203.0.113.224/28: a part of TEST-NET-3 no other test uses): the host reaches the servers of a fake internet, and Stop removes its link.
func TestStart(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("needs root under CI")
		}
		t.Skip("needs root")
	}
	n, err := Start(Config{Link: "sbxfi-test", HostAddr: "10.219.255.1", PeerAddr: "10.219.255.2",
		Routed: netip.MustParsePrefix("203.0.113.224/28"), HTTP: map[string]string{"203.0.113.225:80": "hi"},
		UDPEcho: "203.0.113.226:9999", RouteBack: true})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get("http://203.0.113.225/")
	if err != nil {
		n.Stop()
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "hi" {
		t.Errorf("body %q", b)
	}
	n.Stop()
	if _, err := Start(Config{Link: "sbxfi-test", HostAddr: "10.219.255.1", PeerAddr: "10.219.255.2",
		Routed: netip.MustParsePrefix("203.0.113.224/28"), HTTP: map[string]string{"198.51.100.1:80": "outside"}}); err == nil {
		t.Error("an address outside Routed was accepted")
	} else if errors.Is(err, os.ErrNotExist) {
		t.Error(err)
	}
}
