package client

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/sandboxd/sandboxd/api"
)

// The API's error codes (the "error" field of the envelope).
const (
	CodeInvalidRequest     = "invalid_request"
	CodeUnauthorized       = "unauthorized"
	CodeImageNotApproved   = "image_not_approved"
	CodePathNotAllowed     = "path_not_allowed"
	CodeNotFound           = "not_found"
	CodeSandboxDestroyed   = "sandbox_destroyed"
	CodeSandboxNotReady    = "sandbox_not_ready"
	CodePayloadTooLarge    = "payload_too_large"
	CodeConflict           = "conflict" // files: a file where a directory is needed, a directory not empty
	CodeConcurrencyLimit   = "concurrency_limit"
	CodeRunQueueFull       = "run_queue_full"
	CodeRateLimited        = "rate_limited"
	CodeUnsupported        = "unsupported"
	CodeUnsupportedInMode  = "unsupported_in_mode"
	CodeCapacityExhausted  = "capacity_exhausted"
	CodeProvisioningFailed = "provisioning_failed"
	CodeUnavailable        = "unavailable"
	CodeInternal           = "internal_error"
)

// Error is a failure the server answered with: the API's error envelope, plus the HTTP status and,
// for 429 and 503 answers, how long to wait before trying again.
type Error struct {
	Status     int           // HTTP status
	Code       string        // the API's error code, e.g. "not_found"; "http_<status>" for a body that is no envelope
	Message    string        // for people
	Docs       string        // the envelope's docs link
	RetryAfter time.Duration // from Retry-After; 0 when absent
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s (%d): %s", e.Code, e.Status, e.Message)
}

// Is makes errors.Is(err, &client.Error{Code: client.CodeNotFound}) match by code.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == e.Code && (t.Status == 0 || t.Status == e.Status)
}

// ErrorCode returns the API error code of err ("" when err is not an *Error).
func ErrorCode(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return ""
}

// IsCode reports whether err is an *Error with the given code.
func IsCode(err error, code string) bool { return ErrorCode(err) == code }

// decodeError turns a failed response into an *Error. Bodies that are not the envelope (a proxy's
// page, say) keep their first line as the message.
func decodeError(resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	e := &Error{Status: resp.StatusCode}
	var env api.Error
	if json.Unmarshal(b, &env) == nil && env.Error != "" {
		e.Code, e.Message, e.Docs = env.Error, env.Message, env.Docs
	} else {
		e.Code = "http_" + strconv.Itoa(resp.StatusCode)
		msg := strings.TrimSpace(string(b))
		if i := strings.IndexByte(msg, '\n'); i >= 0 {
			msg = msg[:i]
		}
		if len(msg) > 200 {
			msg = msg[:200] + "…"
		}
		if msg == "" {
			msg = http.StatusText(resp.StatusCode)
		}
		e.Message = msg
	}
	if ra := resp.Header.Get("Retry-After"); ra != "" {
		if n, err := strconv.Atoi(strings.TrimSpace(ra)); err == nil && n >= 0 {
			e.RetryAfter = time.Duration(n) * time.Second
		} else if t, err := http.ParseTime(ra); err == nil {
			e.RetryAfter = max(time.Until(t), 0)
		}
	}
	return e
}

// ChecksumError is a transfer whose bytes do not hash to what the other side reported.
type ChecksumError struct {
	Path string // the path in the sandbox
	Want string // hex SHA-256 the server reported
	Got  string // hex SHA-256 of the bytes sent or received
}

func (e *ChecksumError) Error() string {
	return fmt.Sprintf("checksum mismatch for %s: server has sha256 %s, client %s", e.Path, e.Want, e.Got)
}
