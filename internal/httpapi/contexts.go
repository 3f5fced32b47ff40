package httpapi

import (
	"net/http"

	"github.com/sandboxd/sandboxd/internal/store"
)

func (s *server) createContext(w http.ResponseWriter, r *http.Request, acct store.Account) error {
	c, err := s.svc.CreateContext(r.Context(), acct, r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, c)
	return nil
}

func (s *server) listContexts(w http.ResponseWriter, r *http.Request, acct store.Account) error {
	l, err := s.svc.ListContexts(r.Context(), acct, r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, l)
	return nil
}

func (s *server) getContext(w http.ResponseWriter, r *http.Request, acct store.Account) error {
	c, err := s.svc.GetContext(r.Context(), acct, r.PathValue("id"), r.PathValue("context_id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, c)
	return nil
}

func (s *server) deleteContext(w http.ResponseWriter, r *http.Request, acct store.Account) error {
	if err := s.svc.DeleteContext(r.Context(), acct, r.PathValue("id"), r.PathValue("context_id")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
