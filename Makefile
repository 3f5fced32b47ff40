# sandboxd — the two commands: `make run` (set up and serve) and `make test` (set up and test).
SHELL   := /bin/bash
LISTEN  ?= 127.0.0.1:8080
DATA    ?= data
IMAGE   := agentcop/agent-sandbox:latest
GOFLAGS ?=
export CGO_ENABLED := 0

.PHONY: all deps image build run test bench clean

all: build

deps:
	@scripts/install-deps.sh

# The default image: a Debian root filesystem with python3, cached in ~/.cache/sandboxd.
image: deps
	@scripts/build-image.sh >/dev/null

build:
	go build $(GOFLAGS) -o bin/sandboxd ./cmd/sandboxd
	go build $(GOFLAGS) -o bin/sandbox-agent ./cmd/sandbox-agent

run: image build
	bin/sandboxd serve --listen $(LISTEN) --data-dir $(DATA) --image $(IMAGE)=$$(scripts/build-image.sh)

test: image build
	go vet ./...
	SANDBOXD_ROOTFS=$$(scripts/build-image.sh) SANDBOXD_BIN=$(CURDIR)/bin go test -count=1 -timeout 40m ./...

bench: image build
	bin/sandboxd bench --image $(IMAGE)=$$(scripts/build-image.sh)

clean:
	rm -rf bin
