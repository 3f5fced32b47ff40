package client

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"mime"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/sandboxd/sandboxd/api"
)

func filesRequest(method, id, path string) request {
	return request{method: method, path: sandboxPath(id, "files"), query: url.Values{"path": {path}}}
}

// PutFile streams body to path in the sandbox (parents are created; an existing file is
// replaced). size is the body's length, or -1 when unknown (then it is sent chunked). The body is
// hashed on the way and the call fails with a *ChecksumError when the server stored other bytes.
// The request asks for "100-continue", so a refusal (403 path_not_allowed, 413
// payload_too_large, …) arrives before the body is sent, when the server decides from the headers.
func (c *Client) PutFile(ctx context.Context, id, path string, body io.Reader, size int64) (*api.FileWritten, error) {
	h := sha256.New()
	r := filesRequest("PUT", id, path)
	r.body, r.length = io.TeeReader(body, h), size
	if size == 0 {
		r.body = http.NoBody
	}
	r.header = http.Header{"Content-Type": {"application/octet-stream"}, "Expect": {"100-continue"}}
	var out api.FileWritten
	if _, err := c.call(ctx, r, &out, http.StatusCreated, http.StatusOK); err != nil {
		return nil, err
	}
	if got := hex.EncodeToString(h.Sum(nil)); !strings.EqualFold(out.SHA256, got) {
		return &out, &ChecksumError{Path: path, Want: out.SHA256, Got: got}
	}
	return &out, nil
}

// Range is a byte range of a file: Length bytes from Offset; Length 0 means to the end.
type Range struct {
	Offset, Length int64
}

func (r Range) header() string {
	if r.Length > 0 {
		return fmt.Sprintf("bytes=%d-%d", r.Offset, r.Offset+r.Length-1)
	}
	return fmt.Sprintf("bytes=%d-", r.Offset)
}

// File is an open download. Read it, then Close it.
type File struct {
	io.ReadCloser
	Path    string
	Size    int64  // bytes in this answer (Content-Length), -1 when unknown
	Total   int64  // bytes in the whole file (from Content-Range for a partial answer), -1 when unknown
	SHA256  string // hex SHA-256 of the whole file, from the ETag; "" when the server sent none
	Partial bool   // a 206 answer to a Range request
}

// ErrIsDirectory is returned by GetFile and Download for a path that is a directory.
var ErrIsDirectory = errors.New("is a directory")

// ErrNotDirectory is returned by ListFiles for a path that is a file.
var ErrNotDirectory = errors.New("is a file, not a directory")

// GetFile opens path in the sandbox for reading: the whole file, or rng when it is not nil.
func (c *Client) GetFile(ctx context.Context, id, path string, rng *Range) (*File, error) {
	r := filesRequest("GET", id, path)
	if rng != nil {
		r.header = http.Header{"Range": {rng.header()}}
	}
	resp, err := c.do(ctx, r, http.StatusOK, http.StatusPartialContent)
	if err != nil {
		return nil, err
	}
	if isListing(resp) {
		resp.Body.Close()
		return nil, fmt.Errorf("%s: %w", path, ErrIsDirectory)
	}
	f := &File{ReadCloser: resp.Body, Path: path, Size: resp.ContentLength,
		Partial: resp.StatusCode == http.StatusPartialContent, SHA256: etagSHA256(resp.Header.Get("ETag"))}
	f.Total = f.Size
	if f.Partial {
		f.Total = contentRangeTotal(resp.Header.Get("Content-Range"))
	}
	return f, nil
}

// isListing tells a directory listing from a file's bytes: a listing is JSON and has no ETag.
func isListing(resp *http.Response) bool {
	mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	return mt == "application/json" && resp.Header.Get("ETag") == "" && resp.StatusCode == http.StatusOK
}

// etagSHA256 returns the hex digest in an ETag `"<sha256 hex>"` (or W/"…"), "" for anything else.
func etagSHA256(etag string) string {
	etag = strings.TrimPrefix(strings.TrimSpace(etag), "W/")
	etag = strings.Trim(etag, `"`)
	if len(etag) != 64 {
		return ""
	}
	if _, err := hex.DecodeString(etag); err != nil {
		return ""
	}
	return strings.ToLower(etag)
}

// Download copies the whole file at path to w and returns its size and hex SHA-256. The bytes
// are checked against the ETag's SHA-256 (a *ChecksumError when they differ); w has then
// received them all already, so write to a temporary file and rename it on success.
func (c *Client) Download(ctx context.Context, id, path string, w io.Writer) (int64, string, error) {
	f, err := c.GetFile(ctx, id, path, nil)
	if err != nil {
		return 0, "", err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(w, h), f)
	if err != nil {
		return n, "", fmt.Errorf("download %s: %w", path, err)
	}
	if f.Size >= 0 && n != f.Size {
		return n, "", fmt.Errorf("download %s: got %d of %d bytes", path, n, f.Size)
	}
	sum, err := verify(path, f.SHA256, h)
	return n, sum, err
}

func verify(path, want string, h hash.Hash) (string, error) {
	got := hex.EncodeToString(h.Sum(nil))
	if want != "" && want != got {
		return got, &ChecksumError{Path: path, Want: want, Got: got}
	}
	return got, nil
}

// ListFiles lists the directory dir in the sandbox (a "/" is appended when missing, which makes
// the request a listing whatever the path holds).
func (c *Client) ListFiles(ctx context.Context, id, dir string) (*api.FileList, error) {
	if !strings.HasSuffix(dir, "/") {
		dir += "/"
	}
	var out api.FileList
	resp, err := c.do(ctx, filesRequest("GET", id, dir), http.StatusOK)
	if IsCode(err, CodeConflict) { // the server: a path ending in "/" that is a file
		return nil, fmt.Errorf("%s: %w", strings.TrimSuffix(dir, "/"), ErrNotDirectory)
	}
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if !isListing(resp) {
		return nil, fmt.Errorf("%s: %w", strings.TrimSuffix(dir, "/"), ErrNotDirectory)
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return nil, fmt.Errorf("list %s: decode answer: %w", dir, err)
	}
	return &out, nil
}

// DeleteFile removes the file at path in the sandbox.
func (c *Client) DeleteFile(ctx context.Context, id, path string) error {
	_, err := c.call(ctx, filesRequest("DELETE", id, path), nil, http.StatusNoContent, http.StatusOK)
	return err
}

// contentRangeTotal returns the total size in a Content-Range header ("bytes 0-9/100"), or -1.
func contentRangeTotal(v string) int64 {
	_, total, ok := strings.Cut(v, "/")
	if !ok {
		return -1
	}
	n, err := strconv.ParseInt(total, 10, 64)
	if err != nil {
		return -1
	}
	return n
}
