# meshca — run `make` for the list of targets.
SHELL := bash
.DEFAULT_GOAL := help

GO        ?= go
BIN       := $(CURDIR)/bin
# Where test/tools/build.sh puts (and reuses) the real test servers.
MESHCA_BIN ?= $(CURDIR)/.cache/bin
export MESHCA_BIN

STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.7.0
GOVULNCHECK := golang.org/x/vuln/cmd/govulncheck@v1.1.4

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

.PHONY: build
build: ## build bin/meshca and bin/meshctl
	$(GO) build -trimpath -o $(BIN)/ ./cmd/meshca ./cmd/meshctl

.PHONY: run
run: build ## run meshca on the embedded dev config (no cluster needed)
	$(BIN)/meshca serve --dev

.PHONY: test-servers
test-servers: ## build (or reuse) etcd, kube-apiserver, pilot-agent, helm and vault into $(MESHCA_BIN)
	test/tools/build.sh etcd kube-apiserver pilot-agent helm vault

.PHONY: test
test: test-servers ## run every test with -race (uncached: e2e tests build the binaries), including end-to-end ones on real servers
	$(GO) test -race -count=1 -timeout 20m ./...

.PHONY: test-unit
test-unit: ## run the tests that need no real server (-short: no etcd, kube-apiserver, pilot-agent or helm), with -race
	$(GO) test -race -short -count=1 ./...

.PHONY: test-e2e
test-e2e: test-servers ## run only the end-to-end tests (real kube-apiserver, etcd, pilot-agent)
	$(GO) test -race -count=1 -timeout 20m -v ./test/...

# Seconds (or any go test -fuzztime value) each fuzz target runs in `make fuzz`.
FUZZTIME ?= 30s

.PHONY: fuzz
fuzz: ## run every fuzz target for FUZZTIME each (default 30s), from its seed corpus in <pkg>/testdata/fuzz/
	@set -euo pipefail; \
	for f in $$(git grep -l '^func Fuzz' -- '*_test.go'); do \
		for name in $$(sed -n 's/^func \(Fuzz[A-Za-z0-9_]*\)(.*/\1/p' "$$f"); do \
			echo "== $$name in ./$$(dirname "$$f") for $(FUZZTIME)"; \
			$(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) "./$$(dirname "$$f")"; \
		done; \
	done

.PHONY: bench
bench: build ## load-test a local meshca at concurrency 1, 8 and 64, one connection per client (certs/s, latency, server CPU and RSS)
	test/bench.sh

.PHONY: bench-storm
bench-storm: build ## storms of 250 and 1000 new TLS connections at once, one CSR each (handshakes/s, certs/s)
	BENCH_ARGS="--storm 250,1000" test/bench.sh

.PHONY: bench-vs-istiod
bench-vs-istiod: build ## meshca vs istiod's own CA server (built from istio.io/istio into $(MESHCA_BIN)), same load, alternating
	test/bench-vs-istiod.sh

.PHONY: bench-1m
bench-1m: build ## issue 1,000,000 certificates at concurrency 64, then report server RSS
	BENCH_ARGS="--concurrency 64 --requests 1000000 --warmup 1s" test/bench.sh

.PHONY: bench-sds
bench-sds: build ## hold 10,000 SDS streams: first secrets, memory per stream, bundle push, renewal storm vs new pods (PROFILE=1 for profiles)
	test/bench-sds.sh

.PHONY: bench-admission
bench-admission: build ## new pods' p99 idle vs during a renewal storm that saturates meshca (admission control)
	test/bench-admission.sh

.PHONY: bench-upstream
bench-upstream: build ## the Vault backend in intermediate vs direct mode under the same load (real Vault on loopback)
	test/bench-upstream.sh

.PHONY: bench-go
bench-go: ## Go micro-benchmarks of the hot path (signing, token checks)
	$(GO) test -run '^$$' -bench . -benchmem ./ca/ ./authn/...

.PHONY: lint
lint: ## gofmt, go vet and staticcheck (pinned)
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change: $$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

.PHONY: tidy-check
tidy-check: ## fail if go.mod/go.sum are not tidy
	$(GO) mod tidy -diff

.PHONY: vuln
vuln: ## govulncheck (needs access to the Go vulnerability database)
	$(GO) run $(GOVULNCHECK) ./...

.PHONY: chart-lint
chart-lint: test-servers ## helm lint and render the chart (helm is built by test-servers)
	HOME=$$(mktemp -d) $(MESHCA_BIN)/helm lint --strict charts/meshca
	HOME=$$(mktemp -d) $(MESHCA_BIN)/helm template meshca charts/meshca >/dev/null

.PHONY: clean
clean: ## remove built binaries (keeps the cached test servers)
	rm -rf $(BIN)
