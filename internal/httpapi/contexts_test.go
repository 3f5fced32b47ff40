package httpapi_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/sandboxd/sandboxd/internal/httpapi"
)

// TestContextsOverHTTP: create, list, get, run in, reset, delete code contexts (fakedriver: a
// context run's result is the number of runs its interpreter ran).
func TestContextsOverHTTP(t *testing.T) {
	f := setup(t, httpapi.Options{})
	status, m, _ := call(t, "POST", f.url+"/api/sandbox/create", f.key, seedCreate)
	if status != 201 {
		t.Fatalf("create: %d %v", status, m)
	}
	base := f.url + "/api/sandbox/" + m["sandbox_id"].(string)
	status, m, _ = call(t, "POST", base+"/contexts", f.key, "")
	if status != 201 || m["status"] != "ready" || !strings.HasPrefix(m["context_id"].(string), "ctx_") || m["runs"] != float64(0) {
		t.Fatalf("create context: %d %v", status, m)
	}
	ctx := m["context_id"].(string)
	runIn := func(code string) map[string]any {
		t.Helper()
		status, m, _ := call(t, "POST", base+"/run", f.key, fmt.Sprintf(`{"code":%q,"context":%q}`, code, ctx))
		if status != 200 {
			t.Fatalf("run %q: %d %v", code, status, m)
		}
		return m
	}
	steps := []struct {
		code   string
		status string
		result float64
		reset  bool
		ctxSt  string
	}{
		{"a", "completed", 1, false, "ready"},
		{"b", "completed", 2, false, "ready"},
		{"crash", "failed", 3, false, "reset"},
		{"c", "completed", 1, true, "ready"},
		{"d", "completed", 2, false, "ready"},
	}
	for _, st := range steps {
		m := runIn(st.code)
		_, hasReset := m["context_reset"]
		if m["status"] != st.status || m["result"] != st.result || hasReset != st.reset || m["context"] != ctx {
			t.Errorf("run %q: %v", st.code, m)
		}
		if st.reset && !strings.HasPrefix(m["stderr"].(string), "[sandboxd] this context's interpreter was reset") {
			t.Errorf("run %q: stderr %q", st.code, m["stderr"])
		}
		_, c, _ := call(t, "GET", base+"/contexts/"+ctx, f.key, "")
		if c["status"] != st.ctxSt {
			t.Errorf("after %q: context %v", st.code, c)
		}
	}
	// A fresh run says it is none.
	if _, m, _ = call(t, "POST", base+"/run", f.key, `{"code":"x"}`); m["context"] != nil {
		t.Errorf("fresh run: context %v", m["context"])
	}
	// The limit: 8 that are not deleted.
	for i := 1; i < 8; i++ {
		if status, m, _ = call(t, "POST", base+"/contexts", f.key, ""); status != 201 {
			t.Fatalf("context %d: %d %v", i+1, status, m)
		}
	}
	if status, m, _ = call(t, "POST", base+"/contexts", f.key, ""); status != 409 || m["error"] != "context_limit" {
		t.Fatalf("9th context: %d %v", status, m)
	}
	for i := 0; i < 2; i++ { // idempotent
		if status, _, _ = call(t, "DELETE", base+"/contexts/"+ctx, f.key, ""); status != 204 {
			t.Fatalf("delete context: %d", status)
		}
	}
	if status, m, _ = call(t, "POST", base+"/run", f.key, fmt.Sprintf(`{"code":"x","context":%q}`, ctx)); status != 404 {
		t.Fatalf("run in a deleted context: %d %v", status, m)
	}
	if status, m, _ = call(t, "POST", base+"/contexts", f.key, ""); status != 201 {
		t.Fatalf("context after a delete: %d %v", status, m)
	}
	status, m, _ = call(t, "GET", base+"/contexts", f.key, "")
	if status != 200 || m["total"] != float64(9) {
		t.Fatalf("list: %d %v", status, m)
	}
	if status, _, _ = call(t, "GET", base+"/contexts", f.otherKey, ""); status != 404 {
		t.Fatalf("other account: %d", status)
	}
	// The sandbox's end deletes its contexts.
	call(t, "DELETE", base, f.key, "")
	_, m, _ = call(t, "GET", base+"/contexts", f.key, "")
	for _, c := range m["contexts"].([]any) {
		if c.(map[string]any)["status"] != "deleted" {
			t.Errorf("after the sandbox's delete: %v", c)
		}
	}
}
