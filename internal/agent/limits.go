package agent

// DefaultMaxOutput is the per-stream output budget the agent applies when RunRequest.MaxOutput is
// zero or negative. The agent also uses the budget as the size limit of the JSON of `result`: a
// larger result is replaced by a JSON string saying it was omitted.
const DefaultMaxOutput = 1 << 20

// MaxEventLine is the longest event line Run accepts from the agent. The exit event carries up to
// 2×MaxOutput bytes of output (base64: ×4/3) and the runner's report (at most MaxOutput + 15 MiB,
// sandbox-agent's resultDocCap), passed through without HTML escaping: verbatim but for the
// error's strings, which re-encoding can make at most 3 times as long (an invalid UTF-8 byte
// becomes U+FFFD). With MaxOutput at 1 MiB that is under 51 MiB. An exit event that would still be
// longer (a larger MaxOutput) loses the report's parts in the agent: rich outputs, result, error.
const MaxEventLine = 64 << 20
