package mcpserver

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/client"
)

// TestRunImagesDetected: a run's image output becomes image content only when its bytes are the
// type the code claimed (the code chooses both).
func TestRunImagesDetected(t *testing.T) {
	png := "\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
	files := map[string]string{
		"/.outputs/run_1/0.png": png,
		"/.outputs/run_1/1.png": "<html><script>alert(1)</script>", // claimed image/png
		"/.outputs/run_1/2.jpg": png,                               // claimed image/jpeg
		"/.outputs/run_1/3.jpg": "\xff\xd8\xff\xe0\x00\x10JFIF\x00",
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		data, ok := files[r.URL.Query().Get("path")]
		if !ok {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write([]byte(data))
	}))
	defer srv.Close()
	run := &api.Run{SandboxID: "sbx_1", Outputs: []api.RunOutput{
		{Type: "image/png", Path: "/.outputs/run_1/0.png", Size: int64(len(png))},
		{Type: "image/png", Path: "/.outputs/run_1/1.png", Size: 31},
		{Type: "image/jpeg", Path: "/.outputs/run_1/2.jpg", Size: int64(len(png))},
		{Type: "image/jpeg", Path: "/.outputs/run_1/3.jpg", Size: 11},
	}}
	var got []string
	for _, c := range runImages(context.Background(), &client.Client{BaseURL: srv.URL, APIKey: "k"}, run) {
		im := c.(*mcp.ImageContent)
		got = append(got, im.MIMEType+" "+string(im.Data[:2]))
	}
	want := []string{"image/png \x89P", "image/jpeg \xff\xd8"}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("images %q, want %q", got, want)
	}
}
