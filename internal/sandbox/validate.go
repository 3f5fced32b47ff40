package sandbox

import (
	"fmt"
	"math"
	"path"
	"regexp"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/sandboxd/sandboxd/api"
	"github.com/sandboxd/sandboxd/internal/disk"
	"github.com/sandboxd/sandboxd/internal/egress"
)

// Limits of the contract (API.md §2–3).
const (
	MaxPathsPerList   = 64
	MaxAllowEntries   = 256
	MaxSandboxTimeout = 3600
	DefaultTimeout    = 1800
	MaxRunTimeout     = 600
	DefaultRunTimeout = 30
	MaxCodeBytes      = 1 << 20
	MaxEnvVars        = 64
	MinMemory         = 16 << 20
	MinDisk           = disk.MinSize
	DefaultMemory     = "512m"
	DefaultCPU        = "1"
	MaxOutputBytes    = 1 << 20
	MaxQueuedRuns     = 64
)

var (
	agentIDRe = regexp.MustCompile(`^[A-Za-z0-9._:-]{1,128}$`)
	cpuRe     = regexp.MustCompile(`^[0-9]{1,4}(\.[0-9]{1,3})?$`)
	memoryRe  = regexp.MustCompile(`^([0-9]{1,15})([kKmMgG]?)$`)
)

// reservedPaths belong to the runtime: no rule may name them or anything under them.
var reservedPaths = []string{"/proc", "/sys", "/dev", "/.sandbox", OutputsPath}

// spec is a validated create request: the normalised config to echo and store, and the values the
// service needs.
type spec struct {
	agentID     string
	mode        string
	image       Image
	config      api.Config // normalised, every default filled in
	cpu         float64
	memoryBytes int64
	diskBytes   int64
	timeout     int
	allowSpawn  bool
	network     egress.Policy
}

func invalid(format string, args ...any) *Error { return errorf(KindInvalid, format, args...) }

// validateCreate checks a create request against the contract and the caller's plan, and fills in
// the defaults.
func (s *Service) validateCreate(req api.CreateSandboxRequest, plan Plan) (spec, error) {
	var sp spec
	if req.AgentID == "" {
		return sp, invalid("agent_id is required")
	}
	if !agentIDRe.MatchString(req.AgentID) {
		return sp, invalid("agent_id must be 1-128 characters of A-Z a-z 0-9 . _ : -")
	}
	sp.agentID = req.AgentID
	sp.mode = req.Mode
	if sp.mode == "" {
		sp.mode = ModeContainer
	}
	if sp.mode != ModeContainer && sp.mode != ModeWASM {
		return sp, invalid("mode must be \"container\" or \"wasm\", not %q", req.Mode)
	}
	cfg := api.Config{}
	if req.Config != nil {
		cfg = *req.Config
	}

	// Image.
	img, err := s.resolveImage(cfg.Image, sp.mode)
	if err != nil {
		return sp, err
	}
	sp.image = img
	cfg.Image = img.Name

	// Filesystem.
	fs := api.Filesystem{}
	if cfg.Filesystem != nil {
		fs = *cfg.Filesystem
	}
	seen := map[string]string{}
	for _, l := range []struct {
		name  string
		paths *[]string
		mount bool
	}{
		{"config.filesystem.read_only", &fs.ReadOnly, true},
		{"config.filesystem.read_write", &fs.ReadWrite, true},
		{"config.filesystem.blocked", &fs.Blocked, false},
	} {
		if *l.paths == nil {
			*l.paths = []string{}
		}
		if len(*l.paths) > MaxPathsPerList {
			return sp, invalid("%s has %d entries; at most %d are allowed", l.name, len(*l.paths), MaxPathsPerList)
		}
		for _, p := range *l.paths {
			if err := checkPath(l.name, p, l.mount); err != nil {
				return sp, err
			}
			if other, dup := seen[p]; dup {
				return sp, invalid("path %q is in both %s and %s", p, other, l.name)
			}
			seen[p] = l.name
		}
	}
	cfg.Filesystem = &fs

	// Network.
	nw := api.Network{}
	if cfg.Network != nil {
		nw = *cfg.Network
	}
	if nw.Allow == nil {
		nw.Allow = []string{}
	}
	if len(nw.Allow) > MaxAllowEntries {
		return sp, invalid("config.network.allow has %d entries; at most %d are allowed", len(nw.Allow), MaxAllowEntries)
	}
	if nw.BlockOutbound == nil {
		t := true
		nw.BlockOutbound = &t
	}
	cfg.Network = &nw
	if sp.network, err = egress.ParsePolicy(*nw.BlockOutbound, nw.Allow); err != nil {
		return sp, invalid("config.network.allow: %v", err)
	}
	if sp.mode == ModeWASM && (len(nw.Allow) > 0 || !*nw.BlockOutbound) {
		return sp, errorf(KindUnsupportedInMode, "wasm sandboxes have no network: config.network must be {\"block_outbound\": true} with an empty allow list")
	}

	// Resources.
	rs := api.Resources{}
	if cfg.Resources != nil {
		rs = *cfg.Resources
	}
	if rs.CPU == "" {
		rs.CPU = DefaultCPU
	}
	if !cpuRe.MatchString(rs.CPU) {
		return sp, invalid("config.resources.cpu must be a decimal number of cores such as \"0.5\", not %q", rs.CPU)
	}
	sp.cpu, _ = strconv.ParseFloat(rs.CPU, 64)
	if sp.cpu < 0.01 {
		return sp, invalid("config.resources.cpu must be at least 0.01 cores")
	}
	if sp.cpu > plan.MaxCPU {
		return sp, invalid("config.resources.cpu %s is over your plan's limit of %s cores", rs.CPU, formatCPU(plan.MaxCPU))
	}
	rs.CPU = formatCPU(sp.cpu)
	if rs.Memory == "" {
		rs.Memory = DefaultMemory
	}
	if sp.memoryBytes, err = sizeField("memory", &rs.Memory, MinMemory, plan.MaxMemory); err != nil {
		return sp, err
	}
	if rs.Disk == "" {
		rs.Disk = formatMemory(min(s.cfg.DiskBytes, plan.MaxDisk))
	}
	if sp.diskBytes, err = sizeField("disk", &rs.Disk, MinDisk, plan.MaxDisk); err != nil {
		return sp, err
	}
	if rs.Timeout == nil {
		t := DefaultTimeout
		rs.Timeout = &t
	}
	if *rs.Timeout < 1 || *rs.Timeout > MaxSandboxTimeout {
		return sp, invalid("config.resources.timeout must be 1-%d seconds, not %d", MaxSandboxTimeout, *rs.Timeout)
	}
	sp.timeout = *rs.Timeout
	cfg.Resources = &rs

	// Process.
	pr := api.Process{}
	if cfg.Process != nil {
		pr = *cfg.Process
	}
	if pr.AllowSpawn == nil {
		f := false
		pr.AllowSpawn = &f
	}
	sp.allowSpawn = *pr.AllowSpawn
	cfg.Process = &pr

	sp.config = cfg
	return sp, nil
}

// checkPath enforces: absolute, clean, no NUL, not reserved, a mount not at "/" or "/tmp".
func checkPath(field, p string, mount bool) error {
	switch {
	case p == "":
		return invalid("%s: empty path", field)
	case strings.ContainsRune(p, 0):
		return invalid("%s: path contains a NUL byte", field)
	case !utf8.ValidString(p) || len(p) > 1024:
		return invalid("%s: path %q is not valid UTF-8 of at most 1024 bytes", field, p)
	case !strings.HasPrefix(p, "/"):
		return invalid("%s: path %q must be absolute", field, p)
	case path.Clean(p) != p:
		return invalid("%s: path %q must be clean (no \"..\", \".\", \"//\" or trailing \"/\")", field, p)
	case p == "/":
		return invalid("%s: \"/\" cannot be mounted or blocked", field)
	case mount && (p == "/tmp" || strings.HasPrefix(p, "/tmp/")):
		return invalid("%s: %q: /tmp is already a private writable directory of every sandbox", field, p)
	}
	for _, r := range reservedPaths {
		if p == r || strings.HasPrefix(p, r+"/") {
			return invalid("%s: %q is reserved for the sandbox runtime", field, p)
		}
	}
	return nil
}

// sizeField checks config.resources.<field> (*v, lower-cased in place) against min and the plan's
// max and returns it in bytes.
func sizeField(field string, v *string, min, max int64) (int64, error) {
	n, err := parseSize(field, *v)
	if err != nil {
		return 0, err
	}
	if n < min {
		return 0, invalid("config.resources.%s must be at least %s, not %q", field, formatMemory(min), *v)
	}
	if n > max {
		return 0, invalid("config.resources.%s %s is over your plan's limit of %s", field, *v, formatMemory(max))
	}
	*v = strings.ToLower(*v)
	return n, nil
}

// parseSize reads config.resources.<field>: "512m", "1g", "65536k" or a number of bytes (binary
// units).
func parseSize(field, s string) (int64, error) {
	m := memoryRe.FindStringSubmatch(s)
	if m == nil {
		return 0, invalid("config.resources.%s must look like \"512m\", \"1g\", \"65536k\" or a number of bytes, not %q", field, s)
	}
	n, _ := strconv.ParseInt(m[1], 10, 64)
	shift := map[string]uint{"": 0, "k": 10, "m": 20, "g": 30}[strings.ToLower(m[2])]
	if n > math.MaxInt64>>shift {
		return 0, invalid("config.resources.%s %q is too large", field, s)
	}
	return n << shift, nil
}

func formatCPU(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) }

func formatMemory(b int64) string {
	switch {
	case b%(1<<30) == 0:
		return fmt.Sprintf("%dg", b>>30)
	case b%(1<<20) == 0:
		return fmt.Sprintf("%dm", b>>20)
	case b%(1<<10) == 0:
		return fmt.Sprintf("%dk", b>>10)
	}
	return strconv.FormatInt(b, 10)
}

// validateRun checks a run request and fills in its defaults.
func validateRun(req api.RunRequest) (code string, timeout int, err error) {
	if req.Code == nil {
		return "", 0, invalid("code is required")
	}
	if len(*req.Code) > MaxCodeBytes {
		return "", 0, invalid("code is %d bytes; at most %d are allowed", len(*req.Code), MaxCodeBytes)
	}
	if strings.ContainsRune(*req.Code, 0) {
		return "", 0, invalid("code contains a NUL byte")
	}
	timeout = DefaultRunTimeout
	if req.Timeout != nil {
		timeout = *req.Timeout
	}
	if timeout < 1 || timeout > MaxRunTimeout {
		return "", 0, invalid("timeout must be 1-%d seconds, not %d", MaxRunTimeout, timeout)
	}
	if len(req.Env) > MaxEnvVars {
		return "", 0, invalid("env has %d variables; at most %d are allowed", len(req.Env), MaxEnvVars)
	}
	for k, v := range req.Env {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.ContainsRune(v, 0) {
			return "", 0, invalid("env: %q is not a valid variable (names are non-empty without '=' or NUL; values without NUL)", k)
		}
	}
	return *req.Code, timeout, nil
}
