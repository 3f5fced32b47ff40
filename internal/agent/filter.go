package agent

import (
	"encoding/binary"

	"golang.org/x/net/bpf"
)

// FilterBytes encodes a BPF program as the kernel's struct sock_filter array (native byte order):
// the form in which sandboxd hands the container's seccomp program to the zygote's launcher
// ("sandbox-agent zygote", on its fd 3).
func FilterBytes(raw []bpf.RawInstruction) []byte {
	b := make([]byte, 0, 8*len(raw))
	for _, r := range raw {
		b = binary.NativeEndian.AppendUint16(b, r.Op)
		b = append(b, r.Jt, r.Jf)
		b = binary.NativeEndian.AppendUint32(b, r.K)
	}
	return b
}
