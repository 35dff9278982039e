#!/usr/bin/env bash
# Starts bin/meshca in dev mode in a scratch folder, with a plugged CA that
# the bench replaces by one under a new root, drives it with
# `meshctl bench-sds` (10,000 SDS streams, each its own service account),
# and stops it.
# Extra meshctl bench-sds flags: BENCH_ARGS="--conns 50 --streams-per-conn 200".
# PROFILE=1 saves server CPU profiles of the ramp and of the root rotation,
# a server heap profile with the streams open and a CPU profile of meshctl
# during the bundle push, and prints their top entries.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$repo/.cache/bench-sds
rm -rf "$work" && mkdir -p "$work" && cd "$work"

# The embedded dev configuration (`meshca config dev`; `serve --dev` takes
# no other file), with a plugged CA the bench can rotate and audit lines
# in a file, as in production. The root change makes every stream's
# certificate due at the same moment: the renewal storm of figure 3,
# spread by sds.reissueSpread (SPREAD, default 10s as in production;
# SPREAD=1ms makes the renewals simultaneous).
cat >meshca.yaml <<YAML
trustDomain: cluster.local
server:
  grpcAddress: 127.0.0.1:15012
  adminAddress: 127.0.0.1:15014
  dnsNames: [localhost]
  ipAddresses: [127.0.0.1]
authn:
  chain: [clientcert, jwt]
  audiences: [istio-ca]
  checkServiceAccounts: false
  issuer: https://meshca.dev.invalid
  jwt:
    jwksFile: .meshca-dev/jwks.json
backend:
  type: plugged
  plugged:
    dir: cacerts
    reloadInterval: 100ms
sds:
  reissueSpread: ${SPREAD:-10s}
audit:
  file: audit.log
log:
  level: warn
  format: text
dev:
  enabled: true
  dir: .meshca-dev
YAML
"$repo/bin/meshctl" bench-sds --config meshca.yaml --init-ca >/dev/null
"$repo/bin/meshca" config check --config meshca.yaml >/dev/null

"$repo/bin/meshca" serve --config meshca.yaml --pprof 2>meshca.log &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
	kill -0 $pid 2>/dev/null || { echo "bench-sds: meshca exited (is another meshca, e.g. make run, on ports 15012/15014?)" >&2; cat meshca.log >&2; exit 1; }
	curl -sf http://127.0.0.1:15014/readyz >/dev/null 2>&1 && break
	sleep 0.1
done
# The answer must have come from our meshca, not another one on the port.
sleep 0.2
kill -0 $pid 2>/dev/null || { echo "bench-sds: meshca exited (is another meshca, e.g. make run, on ports 15012/15014?)" >&2; cat meshca.log >&2; exit 1; }
# shellcheck disable=SC2086
"$repo/bin/meshctl" bench-sds --config meshca.yaml ${PROFILE:+--profile "$work/profiles"} ${BENCH_ARGS:-}
echo "audit lines written: $(wc -l <audit.log); server log: $work/meshca.log"
