package main

import (
	"encoding/binary"
	"runtime"
	"testing"

	seccomp "github.com/elastic/go-seccomp-bpf"
	"github.com/elastic/go-seccomp-bpf/arch"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// TestNoSpawnProgram evaluates the allow_spawn=false filter in x/net/bpf's VM. The VM loads words
// big-endian, so each 32-bit field of seccomp_data is stored big-endian at its native offset.
func TestNoSpawnProgram(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skip("syscall numbers below are x86_64's")
	}
	insts, err := noSpawnProgram()
	if err != nil {
		t.Fatal(err)
	}
	vm, err := bpf.NewVM(insts)
	if err != nil {
		t.Fatal(err)
	}
	data := func(auditArch uint32, nr uint32, arg0 uint64) []byte {
		b := make([]byte, 64)
		binary.BigEndian.PutUint32(b[0:], nr)
		binary.BigEndian.PutUint32(b[4:], auditArch)
		binary.BigEndian.PutUint32(b[16:], uint32(arg0))     // low word of args[0]
		binary.BigEndian.PutUint32(b[20:], uint32(arg0>>32)) // high word
		return b
	}
	x86 := uint32(arch.X86_64.ID)
	allow := uint32(seccomp.ActionAllow)
	eperm := uint32(seccomp.ActionErrno) | uint32(unix.EPERM)
	enosys := uint32(seccomp.ActionErrno) | uint32(unix.ENOSYS)
	const threadFlags = unix.CLONE_VM | unix.CLONE_FS | unix.CLONE_FILES | unix.CLONE_SIGHAND |
		unix.CLONE_THREAD | unix.CLONE_SYSVSEM | unix.CLONE_SETTLS | unix.CLONE_PARENT_SETTID | unix.CLONE_CHILD_CLEARTID
	for _, tc := range []struct {
		name string
		data []byte
		want uint32
	}{
		{"read", data(x86, unix.SYS_READ, 0), allow},
		{"execve", data(x86, unix.SYS_EXECVE, 0), allow},
		{"fork", data(x86, unix.SYS_FORK, 0), eperm},
		{"vfork", data(x86, unix.SYS_VFORK, 0), eperm},
		{"clone process", data(x86, unix.SYS_CLONE, uint64(unix.SIGCHLD)), eperm},
		{"clone vfork-like", data(x86, unix.SYS_CLONE, unix.CLONE_VM|unix.CLONE_VFORK|uint64(unix.SIGCHLD)), eperm},
		{"clone thread", data(x86, unix.SYS_CLONE, threadFlags), allow},
		{"clone thread, high bits set", data(x86, unix.SYS_CLONE, threadFlags|1<<40), allow},
		{"clone3", data(x86, unix.SYS_CLONE3, 0), enosys},
		{"x32 fork", data(x86, unix.SYS_FORK|0x40000000, 0), enosys},
		{"i386 fork", data(uint32(arch.I386.ID), 2, 0), enosys},
		{"i386 read", data(uint32(arch.I386.ID), 3, 0), enosys},
	} {
		got, err := vm.Run(tc.data)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if uint32(got) != tc.want {
			t.Errorf("%s: %#x, want %#x", tc.name, uint32(got), tc.want)
		}
	}
}
