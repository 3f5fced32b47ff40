// Package openapitest holds the server's HTTP answers to the API's OpenAPI document
// (api/openapi.json) in tests: a Checker validates one response, a Transport every response an
// http.Client receives. It is for tests only; sandboxd does not link it.
//
// A response passes when its status is declared for its operation, its Content-Type is one of the
// declared media types, its declared headers match their schemas and a JSON body matches its
// schema with no undeclared property (strict mode: the document's response schemas are open for
// clients, the tests hold the server to exactly what they declare). Other bodies (event streams,
// file downloads, metrics) are never read, so streaming works as without the check. A request the
// document does not describe must get the server's catch-all answer, 404 not_found.
package openapitest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"slices"
	"strings"
	"sync"

	"github.com/pb33f/libopenapi"
	"github.com/pb33f/libopenapi-validator/config"
	valerrors "github.com/pb33f/libopenapi-validator/errors"
	"github.com/pb33f/libopenapi-validator/paths"
	"github.com/pb33f/libopenapi-validator/responses"
	"github.com/pb33f/libopenapi-validator/router"
	v3 "github.com/pb33f/libopenapi/datamodel/high/v3"
)

// maxJSONBody bounds the JSON bodies a Checker reads.
const maxJSONBody = 256 << 20

// Checker validates responses against one OpenAPI document. It is safe for concurrent use.
type Checker struct {
	model *v3.Document
	opts  *config.ValidationOptions
	mu    sync.Mutex // the validator's schema cache is shared
	body  responses.ResponseBodyValidator
}

// New parses an OpenAPI 3.1 document.
func New(doc []byte) (*Checker, error) {
	d, err := libopenapi.NewDocument(doc)
	if err != nil {
		return nil, fmt.Errorf("openapi document: %w", err)
	}
	m, err := d.BuildV3Model()
	if err != nil {
		return nil, fmt.Errorf("openapi document model: %w", err)
	}
	opts := []config.Option{config.WithStrictMode(), config.WithFormatAssertions()}
	find := config.NewValidationOptions(opts...)
	// Operations are found through their servers, as a client reaches them: /api/... and
	// /api/v1/... through the document's, /health through its own ("/"), so /api/health is not one.
	find.Router = router.NewRouter(&m.Model)
	return &Checker{
		model: &m.Model,
		opts:  find,
		body:  responses.NewResponseBodyValidator(&m.Model, opts...),
	}, nil
}

// Check validates resp, the answer to req. A JSON body is read and replaced by an equal one;
// other bodies are left unread.
func (c *Checker) Check(req *http.Request, resp *http.Response) error {
	ct := resp.Header.Get("Content-Type")
	mt, _, _ := mime.ParseMediaType(ct)
	isJSON := mt == "application/json"
	view := *resp // what the validator sees: never a streaming body
	view.Body = http.NoBody
	var body []byte
	if isJSON && resp.Body != nil {
		var err error
		body, err = io.ReadAll(io.LimitReader(resp.Body, maxJSONBody))
		resp.Body.Close()
		resp.Body = io.NopCloser(bytes.NewReader(body))
		if err != nil {
			return fmt.Errorf("%s %s → %d: reading the body: %w", req.Method, req.URL.Path, resp.StatusCode, err)
		}
		view.Body = io.NopCloser(bytes.NewReader(body))
	}
	fail := func(format string, args ...any) error {
		return fmt.Errorf("%s %s → %d %s: %s", req.Method, req.URL.RequestURI(), resp.StatusCode, ct, fmt.Sprintf(format, args...))
	}

	item, errs, found := paths.FindPath(req, c.model, c.opts)
	if item == nil || len(errs) > 0 || operation(item, req.Method) == nil {
		// Not in the document: only the catch-all's answer is right.
		var env struct{ Error, Docs string }
		if resp.StatusCode != http.StatusNotFound || !isJSON || json.Unmarshal(body, &env) != nil ||
			env.Error != "not_found" || env.Docs != "/docs/errors#not_found" {
			return fail("the document has no such operation, and the answer is not the catch-all 404 not_found: %s", body)
		}
		return nil
	}
	c.mu.Lock()
	_, verrs := c.body.ValidateResponseBodyWithPathItem(req, &view, item, found)
	c.mu.Unlock()
	verrs = slices.DeleteFunc(verrs, freeForm)
	if len(verrs) == 0 {
		return nil
	}
	return fail("%s\n    body: %.2000s", describe(verrs), body)
}

// freeForm reports whether e is strict mode's complaint about a property of an object whose
// schema declares none: a free-form object (an audit event's detail, a run's result) or a map
// (additionalProperties with a schema), which the schema itself validates. Strict mode is for
// objects that list their properties.
func freeForm(e *valerrors.ValidationError) bool {
	return e.ValidationType == valerrors.StrictValidationType && e.ValidationSubType == valerrors.StrictSubTypeProperty &&
		strings.HasSuffix(e.Reason, "Declared properties: []")
}

func operation(item *v3.PathItem, method string) *v3.Operation {
	switch method {
	case http.MethodGet:
		return item.Get
	case http.MethodPut:
		return item.Put
	case http.MethodPost:
		return item.Post
	case http.MethodDelete:
		return item.Delete
	case http.MethodPatch:
		return item.Patch
	case http.MethodHead:
		return item.Head
	case http.MethodOptions:
		return item.Options
	}
	return nil
}

func describe(errs []*valerrors.ValidationError) string {
	var b strings.Builder
	for _, e := range errs {
		fmt.Fprintf(&b, "\n    %s: %s", e.Message, e.Reason)
		for _, s := range e.SchemaValidationErrors {
			fmt.Fprintf(&b, "\n      - %s (at %s; schema %s)", s.Reason, s.FieldPath, s.KeywordLocation)
		}
	}
	return b.String()
}

// Transport is an http.RoundTripper that checks every response it passes on.
type Transport struct {
	Base    http.RoundTripper // nil: http.DefaultTransport
	Checker *Checker
	Report  func(error) // optional: called with each mismatch as it is found

	mu       sync.Mutex
	failures []error
	checked  int
}

// RoundTrip sends req and checks the response; a mismatch is recorded (Failures), not returned,
// so the test sees the response the server sent.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	base := t.Base
	if base == nil {
		base = http.DefaultTransport
	}
	resp, err := base.RoundTrip(req)
	if err != nil {
		return resp, err
	}
	cerr := t.Checker.Check(req, resp)
	t.mu.Lock()
	t.checked++
	if cerr != nil {
		t.failures = append(t.failures, cerr)
	}
	t.mu.Unlock()
	if cerr != nil && t.Report != nil {
		t.Report(cerr)
	}
	return resp, nil
}

// Failures returns the mismatches so far and how many responses were checked.
func (t *Transport) Failures() (failures []error, checked int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]error(nil), t.failures...), t.checked
}

// Err joins the mismatches so far (nil: none).
func (t *Transport) Err() error {
	f, _ := t.Failures()
	return errors.Join(f...)
}
