package httpapi

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/sandboxd/sandboxd/api"
)

// TestErrorCodesDocumented: the document's ErrorCode lists exactly the codes the API answers with,
// each with its status: the service's error kinds (statusOf) and httpapi's own codes.
func TestErrorCodesDocumented(t *testing.T) {
	var doc struct {
		Components struct {
			Schemas struct {
				ErrorCode struct {
					Enum        []string
					Description string
				}
			}
		}
	}
	if err := json.Unmarshal(api.OpenAPI, &doc); err != nil {
		t.Fatal(err)
	}
	ec := doc.Components.Schemas.ErrorCode
	want := map[string]int{ // httpapi's own
		"unauthorized": http.StatusUnauthorized, "rate_limited": http.StatusTooManyRequests,
		"payload_too_large": http.StatusRequestEntityTooLarge, "client_closed_request": 499,
		"not_found": http.StatusNotFound, "invalid_request": http.StatusBadRequest,
		"owner_failed": http.StatusBadGateway, // forward.go
	}
	for kind, status := range statusOf {
		want[string(kind)] = status
	}
	for code, status := range want {
		if !strings.Contains(ec.Description, fmt.Sprintf("- `%s` (%d): ", code, status)) {
			t.Errorf("ErrorCode's description lacks `%s` (%d)", code, status)
		}
	}
	for _, code := range ec.Enum {
		if _, ok := want[code]; !ok {
			t.Errorf("ErrorCode lists %q, which the API never answers", code)
		}
	}
	if len(ec.Enum) != len(want) {
		t.Errorf("ErrorCode lists %d codes, the API has %d", len(ec.Enum), len(want))
	}
}
