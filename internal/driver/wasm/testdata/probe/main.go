// Command probe is a small WASI program the wasm driver's tests run in place of python.wasm
// (built with GOOS=wasip1 GOARCH=wasm), so the driver's mechanics can be tested without CPython.
// Each argument is one operation, "name:arg[:arg2]"; each prints one line "name result" to
// stdout, result being "ok", "ok <data>" or the error's text.
package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

func main() {
	for _, op := range os.Args[1:] {
		name, rest, _ := strings.Cut(op, ":")
		a, b, _ := strings.Cut(rest, ":")
		fmt.Printf("%s %s\n", op, do(name, a, b))
	}
}

var keep [][]byte

func do(name, a, b string) string {
	res := func(data string, err error) string {
		if err != nil {
			return "err " + err.Error()
		}
		if data != "" {
			return "ok " + data
		}
		return "ok"
	}
	switch name {
	case "read":
		data, err := os.ReadFile(a)
		return res(strings.TrimSpace(string(data)), err)
	case "write":
		return res("", os.WriteFile(a, []byte(b), 0o644))
	case "append":
		f, err := os.OpenFile(a, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err == nil {
			_, err = f.WriteString(b)
			f.Close()
		}
		return res("", err)
	case "mkdir":
		return res("", os.Mkdir(a, 0o755))
	case "remove":
		return res("", os.Remove(a))
	case "rename":
		return res("", os.Rename(a, b))
	case "symlink":
		return res("", os.Symlink(a, b))
	case "link":
		return res("", os.Link(a, b))
	case "readlink":
		return res(os.Readlink(a))
	case "stat":
		st, err := os.Stat(a)
		if err != nil {
			return res("", err)
		}
		return res(st.Mode().String(), nil)
	case "ls":
		ents, err := os.ReadDir(a)
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		return res(strings.Join(names, ","), err)
	case "chdir":
		return res("", os.Chdir(a))
	case "env":
		return res(os.Getenv(a), nil)
	case "stdout", "stderr":
		n, _ := strconv.Atoi(a)
		w := os.Stdout
		if name == "stderr" {
			w = os.Stderr
		}
		chunk := []byte(strings.Repeat("x", 1000))
		for n > 0 {
			c := min(n, len(chunk))
			w.Write(chunk[:c])
			n -= c
		}
		return "ok"
	case "sleep":
		d, _ := time.ParseDuration(a)
		time.Sleep(d)
		return "ok"
	case "spin":
		for {
		}
	case "grow": // allocate and touch a MiB at a time, up to a MiB (or until the runtime dies)
		n, _ := strconv.Atoi(a)
		for i := 0; i < n; i++ {
			buf := make([]byte, 1<<20)
			for j := range buf {
				buf[j] = 1
			}
			keep = append(keep, buf)
		}
		return "ok"
	case "exit":
		n, _ := strconv.Atoi(a)
		os.Exit(n)
	case "print":
		fmt.Println(a)
		return "ok"
	}
	return "unknown op"
}
