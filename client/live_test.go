package client_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/client"
	"github.com/sandboxd/sandboxd/client/clienttest"
	"github.com/sandboxd/sandboxd/internal/waitfor"
)

// TestLive drives a real sandboxd through the client: create, sync and streamed runs, cancel,
// files both ways, errors.
func TestLive(t *testing.T) {
	srv := clienttest.Start(t, clienttest.Options{Pool: "10.221.0.0/16", Config: map[string]any{"max_upload_bytes": 4 << 20}})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c := client.New(srv.URL, srv.Key)

	created, err := c.Create(ctx, api.CreateSandboxRequest{AgentID: "go-client", Config: &api.Config{
		Filesystem: &api.Filesystem{ReadOnly: []string{"/workspace/data"}, ReadWrite: []string{"/workspace/out"}, Blocked: []string{"/workspace/out/private"}},
		Resources:  &api.Resources{Timeout: client.Int(300)},
	}})
	if err != nil {
		t.Fatal(err)
	}
	id := created.SandboxID
	defer c.Delete(context.Background(), id)
	if _, err := c.WaitReady(ctx, id); err != nil {
		t.Fatal(err)
	}

	t.Run("sync run", func(t *testing.T) {
		run, err := c.Run(ctx, id, api.RunRequest{Code: client.Code("print('hi')\nresult = 6*7")})
		if err != nil || run.Status != "completed" || run.Stdout != "hi\n" || string(run.Result) != "42" {
			t.Fatalf("run: %+v %v", run, err)
		}
	})

	t.Run("streamed run", func(t *testing.T) {
		acc, err := c.RunAsync(ctx, id, api.RunRequest{Code: client.Code(
			"import sys, time\nprint('first', flush=True)\nprint('oops', file=sys.stderr, flush=True)\ntime.sleep(1)\nprint('second')")})
		if err != nil {
			t.Fatal(err)
		}
		type chunk struct {
			stream, text string
			at           time.Time
		}
		var mu sync.Mutex
		var got []chunk
		run, err := c.Follow(ctx, id, acc.RunID, func(stream, text string) error {
			mu.Lock()
			defer mu.Unlock()
			got = append(got, chunk{stream, text, time.Now()})
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		var out, errs strings.Builder
		for _, c := range got {
			if c.stream == "stdout" {
				out.WriteString(c.text)
			} else {
				errs.WriteString(c.text)
			}
		}
		if out.String() != "first\nsecond\n" || errs.String() != "oops\n" || run.Status != "completed" || run.Stdout != out.String() {
			t.Fatalf("streamed %q / %q, run %+v", out.String(), errs.String(), run)
		}
		if run.FinishedAt == nil || !got[0].at.Before(run.FinishedAt.Add(-500*time.Millisecond)) {
			t.Fatalf("the first chunk arrived at %v, the run finished at %v: not live", got[0].at, run.FinishedAt)
		}
		// Resume from the middle of a finished run: only the rest comes.
		s, err := c.Events(ctx, id, acc.RunID, "6.0")
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		var rest strings.Builder
		for {
			ev, err := s.Next()
			if err != nil {
				t.Fatalf("replay: %v", err)
			}
			if ev.Type == "end" {
				break
			}
			if ev.Type == "stdout" {
				text, _ := ev.Text()
				rest.WriteString(text)
			}
		}
		if rest.String() != "second\n" {
			t.Fatalf("resumed after 6.0: %q", rest.String())
		}
	})

	t.Run("cancel", func(t *testing.T) {
		acc, err := c.RunAsync(ctx, id, api.RunRequest{Code: client.Code("import time\ntime.sleep(60)"), Timeout: client.Int(120)})
		if err != nil {
			t.Fatal(err)
		}
		waitfor.True(t, 30*time.Second, func() bool { // cancel a run that is running, not one queued
			run, err := c.GetRun(ctx, id, acc.RunID)
			return err == nil && run.Status == "running"
		})
		if _, err := c.CancelRun(ctx, id, acc.RunID); err != nil {
			t.Fatal(err)
		}
		run, err := c.WaitRun(ctx, id, acc.RunID)
		if err != nil || run.Status != "cancelled" {
			t.Fatalf("after cancel: %+v %v", run, err)
		}
	})

	t.Run("files", func(t *testing.T) {
		data := make([]byte, 3<<20+17)
		rand.Read(data)
		sum := sha256.Sum256(data)
		fw, err := c.PutFile(ctx, id, "/workspace/data/in/blob.bin", bytes.NewReader(data), int64(len(data)))
		if err != nil || fw.Size != int64(len(data)) || fw.SHA256 != hex.EncodeToString(sum[:]) {
			t.Fatalf("put: %+v %v", fw, err)
		}
		run, err := c.Run(ctx, id, api.RunRequest{Code: client.Code(
			"import hashlib, shutil\nb = open('/workspace/data/in/blob.bin','rb').read()\nopen('/workspace/out/copy.bin','wb').write(b[::-1])\nresult = hashlib.sha256(b).hexdigest()")})
		if err != nil || run.Status != "completed" || string(run.Result) != `"`+fw.SHA256+`"` {
			t.Fatalf("run over the upload: %+v %v", run, err)
		}
		var buf bytes.Buffer
		n, got, err := c.Download(ctx, id, "/workspace/out/copy.bin", &buf)
		rev := make([]byte, len(data))
		for i := range data {
			rev[len(data)-1-i] = data[i]
		}
		want := sha256.Sum256(rev)
		if err != nil || n != int64(len(data)) || got != hex.EncodeToString(want[:]) || !bytes.Equal(buf.Bytes(), rev) {
			t.Fatalf("download: %d %s %v", n, got, err)
		}
		f, err := c.GetFile(ctx, id, "/workspace/out/copy.bin", &client.Range{Offset: 10, Length: 5})
		if err != nil {
			t.Fatal(err)
		}
		part, _ := io.ReadAll(f)
		f.Close()
		if !f.Partial || !bytes.Equal(part, rev[10:15]) || f.Total != int64(len(data)) {
			t.Fatalf("range: partial %v total %d %x", f.Partial, f.Total, part)
		}
		list, err := c.ListFiles(ctx, id, "/workspace/data/in")
		if err != nil || len(list.Entries) != 1 || list.Entries[0].Name != "blob.bin" || list.Entries[0].Size != int64(len(data)) || list.Entries[0].Type != "file" {
			t.Fatalf("list: %+v %v", list, err)
		}
		if _, _, err := c.Download(ctx, id, "/workspace/data/in", io.Discard); !errors.Is(err, client.ErrIsDirectory) {
			t.Fatalf("download of a directory: %v", err)
		}
		if _, err := c.ListFiles(ctx, id, "/workspace/data/in/blob.bin"); !errors.Is(err, client.ErrNotDirectory) {
			t.Fatalf("list a file: %v", err)
		}
		if _, err := c.PutFile(ctx, id, "/workspace/data/in/blob.bin/x", strings.NewReader("x"), 1); !client.IsCode(err, client.CodeConflict) {
			t.Fatalf("put under a file: %v", err)
		}
		if err := c.DeleteFile(ctx, id, "/workspace/data/in/blob.bin"); err != nil {
			t.Fatal(err)
		}
		if _, _, err := c.Download(ctx, id, "/workspace/data/in/blob.bin", io.Discard); !client.IsCode(err, client.CodeNotFound) {
			t.Fatalf("after delete: %v", err)
		}
		for _, p := range []string{"/etc/passwd", "/workspace/out/private/x", "/workspace/out/../../etc/passwd", "/tmp/x"} {
			if _, err := c.PutFile(ctx, id, p, strings.NewReader("x"), 1); !client.IsCode(err, client.CodePathNotAllowed) {
				t.Errorf("put %s: %v, want path_not_allowed", p, err)
			}
		}
		big := io.LimitReader(rand.Reader, 5<<20)
		if _, err := c.PutFile(ctx, id, "/workspace/out/big", big, 5<<20); !client.IsCode(err, client.CodePayloadTooLarge) {
			t.Fatalf("over the limit: %v", err)
		}
		big = io.LimitReader(rand.Reader, 5<<20)
		if _, err := c.PutFile(ctx, id, "/workspace/out/big", big, -1); !client.IsCode(err, client.CodePayloadTooLarge) {
			t.Fatalf("over the limit, chunked: %v", err)
		}
	})

	t.Run("errors", func(t *testing.T) {
		if _, err := c.Create(ctx, api.CreateSandboxRequest{AgentID: "x", Config: &api.Config{Image: "nope:1"}}); !client.IsCode(err, client.CodeImageNotApproved) {
			t.Fatalf("bad image: %v", err)
		}
		if _, err := c.Get(ctx, "sbx_doesnotexist"); !client.IsCode(err, client.CodeNotFound) {
			t.Fatalf("unknown sandbox: %v", err)
		}
		if _, err := client.New(srv.URL, "sbxk_wrong").List(ctx, client.ListOptions{}); !client.IsCode(err, client.CodeUnauthorized) {
			t.Fatalf("bad key: %v", err)
		}
		list, err := c.List(ctx, client.ListOptions{AgentID: "go-client"})
		if err != nil || list.Total != 1 || list.Sandboxes[0].SandboxID != id {
			t.Fatalf("list: %+v %v", list, err)
		}
	})

	if err := c.Delete(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Run(ctx, id, api.RunRequest{Code: client.Code("1")}); !client.IsCode(err, client.CodeSandboxDestroyed) {
		t.Fatalf("run after delete: %v", err)
	}
}
