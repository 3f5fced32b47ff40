package httpapi

import (
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/store"
)

func (s *server) health(w http.ResponseWriter, r *http.Request, _ store.Account) error {
	runtimes, ok := s.svc.Health(r.Context())
	h := api.Health{Status: "ok", Version: s.opts.Version, Runtimes: runtimes, Images: map[string]api.ImageState{}}
	for _, im := range s.svc.Images() { // an image being built, or whose build failed, leaves the service "ok"
		h.Images[im.Name] = im.ImageState
	}
	status := http.StatusOK
	if !ok {
		h.Status, status = "degraded", http.StatusServiceUnavailable
	}
	writeJSON(w, status, h)
	return nil
}

func (s *server) create(w http.ResponseWriter, r *http.Request, acct store.Account) error {
	var req api.CreateSandboxRequest
	if err := decode(w, r, maxBody, &req); err != nil {
		return err
	}
	resp, err := s.svc.Create(r.Context(), acct, req)
	if err != nil {
		return err
	}
	status := http.StatusCreated
	if resp.Status != store.SandboxReady {
		status = http.StatusAccepted
	}
	w.Header().Set("Location", apiPrefix(r)+"/sandbox/"+resp.SandboxID)
	writeJSON(w, status, resp)
	return nil
}

func (s *server) get(w http.ResponseWriter, r *http.Request, acct store.Account) error {
	sb, err := s.svc.Get(r.Context(), acct, r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, sb)
	return nil
}

func (s *server) list(w http.ResponseWriter, r *http.Request, acct store.Account) error {
	p, l, err := page(r)
	if err != nil {
		return err
	}
	q := r.URL.Query()
	switch st := q.Get("status"); st {
	case "", store.SandboxProvisioning, store.SandboxReady, store.SandboxRunning, store.SandboxDestroyed, store.SandboxError:
	default:
		return apiError(http.StatusBadRequest, "invalid_request",
			fmt.Sprintf("status %q is not a sandbox status (provisioning, ready, running, destroyed, error)", st))
	}
	out, err := s.svc.List(r.Context(), acct, q.Get("status"), q.Get("agent_id"), p, l)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *server) delete(w http.ResponseWriter, r *http.Request, acct store.Account) error {
	if err := s.svc.Delete(r.Context(), acct, r.PathValue("id")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *server) run(w http.ResponseWriter, r *http.Request, acct store.Account) error {
	var req api.RunRequest
	if err := decode(w, r, maxRunBody, &req); err != nil {
		return err
	}
	run, accepted, err := s.svc.Run(r.Context(), acct, r.PathValue("id"), req)
	if err != nil {
		return err
	}
	if accepted {
		w.Header().Set("Location", apiPrefix(r)+"/sandbox/"+run.SandboxID+"/runs/"+run.RunID)
		writeJSON(w, http.StatusAccepted, api.RunAccepted{RunID: run.RunID, SandboxID: run.SandboxID, Status: run.Status})
		return nil
	}
	writeJSON(w, http.StatusOK, run)
	return nil
}

func (s *server) getRun(w http.ResponseWriter, r *http.Request, acct store.Account) error {
	run, err := s.svc.GetRun(r.Context(), acct, r.PathValue("id"), r.PathValue("run_id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, run)
	return nil
}

func (s *server) listRuns(w http.ResponseWriter, r *http.Request, acct store.Account) error {
	p, l, err := page(r)
	if err != nil {
		return err
	}
	out, err := s.svc.ListRuns(r.Context(), acct, r.PathValue("id"), p, l)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *server) cancelRun(w http.ResponseWriter, r *http.Request, acct store.Account) error {
	run, err := s.svc.CancelRun(r.Context(), acct, r.PathValue("id"), r.PathValue("run_id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, run)
	return nil
}

func (s *server) usage(w http.ResponseWriter, r *http.Request, acct store.Account) error {
	today := time.Now().UTC().Truncate(24 * time.Hour)
	from, err := timeParam(r, "from", today.AddDate(0, 0, -30))
	if err != nil {
		return err
	}
	to, err := timeParam(r, "to", today.AddDate(0, 0, 1))
	if err != nil {
		return err
	}
	if !to.After(from) {
		return apiError(http.StatusBadRequest, "invalid_request", "to must be after from")
	}
	out, err := s.svc.Usage(r.Context(), acct, from, to)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *server) audit(w http.ResponseWriter, r *http.Request, acct store.Account) error {
	p, l, err := page(r)
	if err != nil {
		return err
	}
	from, err := timeParam(r, "from", time.Time{})
	if err != nil {
		return err
	}
	to, err := timeParam(r, "to", time.Time{})
	if err != nil {
		return err
	}
	q := r.URL.Query()
	out, err := s.svc.Audit(r.Context(), acct, store.EventFilter{SandboxID: q.Get("sandbox_id"), Type: q.Get("type"), From: from, To: to}, p, l)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *server) images(w http.ResponseWriter, r *http.Request, _ store.Account) error {
	writeJSON(w, http.StatusOK, api.ImageList{Images: s.svc.Images()})
	return nil
}

// apiPrefix is the prefix the request came in under: "/api/v1" or "/api".
func apiPrefix(r *http.Request) string {
	if strings.HasPrefix(r.URL.Path, "/api/v1/") {
		return "/api/v1"
	}
	return "/api"
}
