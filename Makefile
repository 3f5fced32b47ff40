# sandboxd — the two commands: `make run` (set up and serve) and `make test` (set up and test).
SHELL   := /bin/bash
LISTEN  ?= 127.0.0.1:8080
DATA    ?= data
IMAGE   := agentcop/agent-sandbox:latest
SLIM    := agentcop/agent-sandbox:slim
WASM    := python:3.11-wasi
GOFLAGS ?=
export CGO_ENABLED := 0

.PHONY: all deps image wasm vm runsc k8s caches build doctor run test test-kubernetes test-vm bench clean

all: build

deps:
	@scripts/install-deps.sh

# The container images, Debian root filesystems cached in ~/.cache/sandboxd: the default (data)
# image, python3 with numpy, pandas, scipy, matplotlib and more, the slim one, python3 alone, and
# PostgreSQL's for deploy/kubernetes/postgres.yaml (the kubernetes pass of test/e2e deploys it).
image: deps
	@scripts/build-image.sh >/dev/null
	@scripts/build-image.sh slim >/dev/null
	@scripts/build-image.sh postgres >/dev/null

# The WASM image: CPython 3.11 for wasm32-wasi built from Debian's sources (about 4-8 minutes the
# first time), cached in ~/.cache/sandboxd/python-wasm.
wasm:
	@scripts/build-python-wasm.sh >/dev/null

# The cgroup v2 test VM: Debian 12's kernel, its modules and an initramfs (about 30 s the first
# time), cached in ~/.cache/sandboxd/vm; test/vm boots it under qemu.
vm: deps
	@scripts/build-vm.sh >/dev/null

# gVisor's runsc, built statically from the gvisor.dev/gvisor module at a pinned pseudo-version
# (about 2.5 min the first time), cached in ~/.cache/sandboxd/runsc: the container driver's third
# OCI runtime (--runtime runsc), which the container tests and bench run too.
runsc:
	@scripts/build-runsc.sh >/dev/null

# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and etcd, built statically from
# their Go modules at pinned versions (about 19 min the first time), cached in
# ~/.cache/sandboxd/k8s: the single-node cluster internal/k8stest runs for the tests.
k8s:
	@scripts/build-k8s.sh >/dev/null

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
	@LISTEN=$(LISTEN) DATA=$(DATA) IMAGE=$(IMAGE) SLIM=$(SLIM) WASM=$(WASM) scripts/run.sh

# The host's tests first, then test/vm alone: the VM's two emulated CPUs take both cores of a
# small machine, and timing-sensitive host tests must not share them. test/vm's summary lines
# (vm[init|systemd]: boot, tests, results) are printed; its whole output goes to bin/test-vm.log.
TESTENV = SANDBOXD_ROOTFS=$$(scripts/build-image.sh) SANDBOXD_POSTGRES_ROOTFS=$$(scripts/build-image.sh postgres) \
	SANDBOXD_PYTHON_WASM=$$(scripts/build-python-wasm.sh 2>/dev/null) \
	SANDBOXD_RUNSC=$$(scripts/build-runsc.sh 2>/dev/null) SANDBOXD_K8S=$$(scripts/build-k8s.sh 2>/dev/null) \
	SANDBOXD_BIN=$(CURDIR)/bin

# The images, python.wasm, runsc, the Kubernetes binaries, the test VM and the npm packages that
# check api/openapi.json, built in parallel when missing (scripts/caches.sh).
caches:
	@scripts/caches.sh

test: caches build
	go vet ./...
	s=$$SECONDS; $(TESTENV) SANDBOXD_NODE_MODULES=$$(scripts/build-node-tools.sh) \
		go test -count=1 -timeout 40m $$(go list ./... | grep -v '/test/vm$$') \
		&& { echo "make test: host tests passed in $$((SECONDS - s)) s"; }
	@$(MAKE) --no-print-directory test-kubernetes
	@$(MAKE) --no-print-directory test-vm

# The API end-to-end suite (test/e2e) again, against the kubernetes driver: every server is two
# replicas on PostgreSQL, on the single-node cluster of internal/k8stest (part of make test).
test-kubernetes: caches build
	s=$$SECONDS; $(TESTENV) SANDBOXD_E2E_DRIVER=kubernetes go test -count=1 -timeout 30m ./test/e2e \
		&& { echo "make test: the API suite against the kubernetes driver passed in $$((SECONDS - s)) s"; }

# test/vm alone (part of make test).
test-vm: image wasm vm build
	s=$$SECONDS; set -o pipefail; $(TESTENV) SANDBOXD_VM=$$(scripts/build-vm.sh 2>/dev/null) \
		go test -count=1 -timeout 60m -v ./test/vm 2>&1 | tee bin/test-vm.log | grep -E '^( {0,4}--- |vm\[|ok |FAIL|PASS$$)' \
		&& { echo "make test: cgroup v2 VM tests passed in $$((SECONDS - s)) s (output: bin/test-vm.log)"; } \
		|| { tail -n 60 bin/test-vm.log; echo "make test: cgroup v2 VM tests failed after $$((SECONDS - s)) s (output: bin/test-vm.log)"; exit 1; }

# sandboxd bench (its own server; every figure beside its baseline), then the cluster's figures
# beside the local driver's, measured in the same run (test/e2e TestMeasureCluster: the k8s cache).
bench: image wasm runsc k8s build
	bin/sandboxd bench --image $(IMAGE)=$$(scripts/build-image.sh) --wasm-image $(WASM)=$$(scripts/build-python-wasm.sh 2>/dev/null) \
		--runsc $$(scripts/build-runsc.sh 2>/dev/null)
	set -o pipefail; $(TESTENV) SANDBOXD_MEASURE=1 go test -count=1 -run '^TestMeasureCluster$$' -v ./test/e2e | grep -E 'bench\[|^(FAIL|ok)'

clean:
	rm -rf bin
