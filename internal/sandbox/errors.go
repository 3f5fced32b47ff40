package sandbox

import (
	"errors"
	"fmt"
	"time"
)

// Kind classifies an error. The kinds are the API's stable error codes; only httpapi maps them to
// HTTP statuses.
type Kind string

// The kinds of error the service returns.
const (
	KindInvalid             Kind = "invalid_request"
	KindUnsupported         Kind = "unsupported"
	KindUnsupportedInMode   Kind = "unsupported_in_mode"
	KindImageNotApproved    Kind = "image_not_approved"
	KindNotFound            Kind = "not_found"
	KindConcurrencyLimit    Kind = "concurrency_limit"
	KindRunQueueFull        Kind = "run_queue_full"
	KindSandboxDestroyed    Kind = "sandbox_destroyed"
	KindSandboxNotReady     Kind = "sandbox_not_ready"
	KindCapacityExhausted   Kind = "capacity_exhausted"
	KindProvisioningFailed  Kind = "provisioning_failed"
	KindPathNotAllowed      Kind = "path_not_allowed"     // files API: outside the mounts, blocked, escaping
	KindPayloadTooLarge     Kind = "payload_too_large"    // files API: over the upload limit
	KindInsufficientStorage Kind = "insufficient_storage" // files API: the sandbox's disk is full
	KindConflict            Kind = "conflict"             // files API: a directory where a file is meant, …
	KindUnavailable         Kind = "unavailable"          // the service is shutting down (httpapi: or the owner replica does not answer)
	KindImageNotReady       Kind = "image_not_ready"      // the image is being built, or its build failed
	KindContextLimit        Kind = "context_limit"        // the sandbox has MaxContexts code contexts
	KindInternal            Kind = "internal_error"
)

// Error is an error with a kind and a message fit for the API's users. The wrapped error, if any,
// is for logs only.
type Error struct {
	Kind    Kind
	Message string
	Err     error
	// RetryAfter, when above zero, is when the call may succeed if tried again (an estimate).
	RetryAfter time.Duration
}

func (e *Error) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("%s: %s: %v", e.Kind, e.Message, e.Err)
	}
	return fmt.Sprintf("%s: %s", e.Kind, e.Message)
}

func (e *Error) Unwrap() error { return e.Err }

func errorf(k Kind, format string, args ...any) *Error {
	return &Error{Kind: k, Message: fmt.Sprintf(format, args...)}
}

func internal(msg string, err error) *Error {
	return &Error{Kind: KindInternal, Message: msg, Err: err}
}

// KindOf returns the kind of err: the kind of the first *Error in its chain, KindInternal for any
// other error.
func KindOf(err error) Kind {
	var e *Error
	if errors.As(err, &e) {
		return e.Kind
	}
	return KindInternal
}
