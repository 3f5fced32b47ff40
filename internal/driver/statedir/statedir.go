// Package statedir holds what the drivers share about their on-disk state: the sandbox IDs they
// accept as directory and container names, and small helpers for the files they keep there.
package statedir

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
)

var idPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// CheckID accepts a sandbox ID usable as a file and container name: 1-64 of A-Z a-z 0-9 _ . -,
// not starting with a punctuation character.
func CheckID(id string) error {
	if !idPattern.MatchString(id) {
		return fmt.Errorf("invalid sandbox id %q (want 1-64 of A-Z a-z 0-9 _ . -)", id)
	}
	return nil
}

// WriteJSON writes v as JSON to name (mode 0600).
func WriteJSON(name string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return os.WriteFile(name, b, 0o600)
}

// RandomHex returns n random bytes in hex.
func RandomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// ChownTree gives dir and everything below it (symlinks themselves, never their targets) to
// uid:gid.
func ChownTree(dir string, uid, gid int) error {
	return filepath.WalkDir(dir, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, uid, gid)
	})
}
