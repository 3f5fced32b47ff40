package agentcall_test

import (
	"strings"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/internal/agentcall"
)

// TestCheck: what an endpoint may be; the timeout is 0 (the default) or up to 600 seconds (the
// config file's, 1 to 600 seconds, are checked by package config).
func TestCheck(t *testing.T) {
	for _, c := range []struct {
		name string
		e    agentcall.Endpoint
		err  string // "": valid
	}{
		{"plain", agentcall.Endpoint{URL: "http://127.0.0.1:9000/agent"}, ""},
		{"https with a header", agentcall.Endpoint{URL: "https://h/", Headers: map[string]string{"Authorization": "Bearer x"}}, ""},
		{"no url", agentcall.Endpoint{}, `url "": want an absolute`},
		{"user info", agentcall.Endpoint{URL: "http://u:p@h/"}, `url "http://u:p@h/"`},
		{"file url", agentcall.Endpoint{URL: "file:///etc/passwd"}, "url "},
		{"header with CRLF", agentcall.Endpoint{URL: "http://h/", Headers: map[string]string{"X": "a\r\nHost: evil"}}, `header "X"`},
		{"Host header", agentcall.Endpoint{URL: "http://h/", Headers: map[string]string{"host": "evil"}}, `header "host" is sandboxd's to set`},
		{"default timeout", agentcall.Endpoint{URL: "http://h/", Timeout: 0}, ""},
		{"1 s", agentcall.Endpoint{URL: "http://h/", Timeout: time.Second}, ""},
		{"600 s", agentcall.Endpoint{URL: "http://h/", Timeout: agentcall.MaxTimeout}, ""},
		{"under 1 s", agentcall.Endpoint{URL: "http://h/", Timeout: 300 * time.Millisecond}, ""},
		{"over 600 s", agentcall.Endpoint{URL: "http://h/", Timeout: agentcall.MaxTimeout + time.Second}, "timeout 10m1s: want at most 600 seconds (0: the default, 30s)"},
		{"negative", agentcall.Endpoint{URL: "http://h/", Timeout: -time.Second}, "timeout -1s: want at most 600 seconds"},
	} {
		err := c.e.Check()
		if (err == nil) != (c.err == "") || err != nil && !strings.Contains(err.Error(), c.err) {
			t.Errorf("%s: %v, want %q", c.name, err, c.err)
		}
	}
}
