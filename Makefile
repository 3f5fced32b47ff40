# sandboxd — the two commands: `make run` (set up and serve) and `make test` (set up and test).
SHELL   := /bin/bash
LISTEN  ?= 127.0.0.1:8080
DATA    ?= data
IMAGE   := agentcop/agent-sandbox:latest
WASM    := python:3.11-wasi
GOFLAGS ?=
export CGO_ENABLED := 0

.PHONY: all deps image wasm build doctor run test bench clean

all: build

deps:
	@scripts/install-deps.sh

# The default image: a Debian root filesystem with python3, cached in ~/.cache/sandboxd.
image: deps
	@scripts/build-image.sh >/dev/null

# The WASM image: CPython 3.11 for wasm32-wasi built from Debian's sources (about 4-8 minutes the
# first time), cached in ~/.cache/sandboxd/python-wasm.
wasm:
	@scripts/build-python-wasm.sh >/dev/null

build:
	go build $(GOFLAGS) -o bin/sandboxd ./cmd/sandboxd
	go build $(GOFLAGS) -o bin/sandbox-agent ./cmd/sandbox-agent

# Checks this host (root, kernel features, cgroups, OCI runtime, tools, disk space): one line per
# requirement with its fix; fails when something required is missing.
doctor: deps build
	bin/sandboxd doctor --data-dir $(DATA)

# Dependencies, the binaries, the host check (sandboxd doctor: stops here, with the fix, when
# something required is missing), the image — one line each, the tools' output in $(DATA)/logs/ —
# then serve; the WASM image is built by the server in the background (scripts/run.sh says more).
run:
	@LISTEN=$(LISTEN) DATA=$(DATA) IMAGE=$(IMAGE) WASM=$(WASM) scripts/run.sh

test: image wasm build
	go vet ./...
	SANDBOXD_ROOTFS=$$(scripts/build-image.sh) SANDBOXD_PYTHON_WASM=$$(scripts/build-python-wasm.sh 2>/dev/null) \
		SANDBOXD_BIN=$(CURDIR)/bin go test -count=1 -timeout 40m ./...

bench: image wasm build
	bin/sandboxd bench --image $(IMAGE)=$$(scripts/build-image.sh) --wasm-image $(WASM)=$$(scripts/build-python-wasm.sh 2>/dev/null)

clean:
	rm -rf bin
