package agent

// DefaultMaxOutput is the per-stream output budget the agent applies when RunRequest.MaxOutput is
// zero or negative. The agent also uses the budget as the size limit of the JSON of `result`: a
// larger result is replaced by a JSON string saying it was omitted.
const DefaultMaxOutput = 1 << 20

// MaxEventLine is the longest event line Run accepts from the agent. The exit event carries up to
// 2×MaxOutput bytes of output (base64: ×4/3) plus the result, so this bounds MaxOutput to about
// 16 MiB.
const MaxEventLine = 64 << 20
