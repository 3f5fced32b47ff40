package httpapi

import (
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"strconv"
	"strings"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/store"
)

// openAPIETag identifies the version of the document served.
var openAPIETag = func() string {
	sum := sha256.Sum256(api.OpenAPI)
	return `"` + hex.EncodeToString(sum[:16]) + `"`
}()

// openAPI: GET /api/openapi.json — the API's OpenAPI document as-is; no key needed.
func (s *server) openAPI(w http.ResponseWriter, r *http.Request, _ store.Account) error {
	h := w.Header()
	h.Set("ETag", openAPIETag)
	h.Set("Cache-Control", "no-cache")
	if m := r.Header.Get("If-None-Match"); m == "*" || strings.Contains(m, openAPIETag) {
		w.WriteHeader(http.StatusNotModified)
		return nil
	}
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(api.OpenAPI)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(api.OpenAPI)
	return nil
}
