#!/usr/bin/env bash
# Measures what direct mode costs: meshca on a real Vault (dev server on
# loopback, built by test/tools/build.sh vault), once in intermediate mode
# (meshca signs leaves with a Vault-signed intermediate) and once in direct
# mode (Vault signs every leaf), under the same `meshctl bench` load. Vault,
# meshca and the load generator share the machine's cores, as they would
# not in production: compare the two modes of one run, not absolute figures.
# Extra meshctl bench flags: BENCH_ARGS="--concurrency 8 --duration 10s".
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=${MESHCA_BIN:-$repo/.cache/bin}
"$repo/test/tools/build.sh" vault >/dev/null
work=$repo/.cache/bench-upstream
rm -rf "$work" && mkdir -p "$work" && cd "$work"
port=18299
export VAULT_ADDR=http://127.0.0.1:$port
HOME=$work "$bin/vault" server -dev -dev-listen-address=127.0.0.1:$port -dev-root-token-id=root -dev-no-store-token >vault.log 2>&1 &
vpid=$!
pid=
trap 'kill $vpid ${pid:-} 2>/dev/null; wait 2>/dev/null || true' EXIT
until curl -sf "$VAULT_ADDR/v1/sys/health" >/dev/null 2>&1; do
	kill -0 $vpid 2>/dev/null || { echo "bench-upstream: vault exited:" >&2; tail -20 vault.log >&2; exit 1; }
	sleep 0.1
done
v() { curl -sf -H "X-Vault-Token: root" -X "$1" "$VAULT_ADDR/v1/$2" ${3:+-d "$3"}; }
v POST sys/mounts/pki '{"type":"pki","config":{"max_lease_ttl":"87600h"}}' >/dev/null
v POST pki/root/generate/internal '{"common_name":"bench root","ttl":"87600h","key_type":"ec","key_bits":256}' >/dev/null
v POST pki/roles/mesh '{"allow_any_name":true,"allowed_uri_sans":["spiffe://cluster.local/*"],"require_cn":false,"use_csr_common_name":false,"use_csr_sans":false,"key_type":"any","max_ttl":"192h","allow_ip_sans":true}' >/dev/null
v POST auth/token/create '{"ttl":"2h"}' | sed -n 's/.*"client_token":"\([^"]*\)".*/\1/p' >vault-token
for mode in intermediate direct; do
	"$repo/bin/meshca" config dev | sed '/^backend:/,/^  type: selfsigned/d' >"meshca-$mode.yaml"
	cat >>"meshca-$mode.yaml" <<YAML
backend:
  type: vault
  vault:
    mode: $mode
    address: $VAULT_ADDR
    role: mesh
    auth: {method: token, tokenFile: $work/vault-token}
YAML
	"$repo/bin/meshca" serve --config "meshca-$mode.yaml" --log-level warn >"audit-$mode.log" 2>"meshca-$mode.log" &
	pid=$!
	for _ in $(seq 1 100); do
		kill -0 $pid 2>/dev/null || { echo "bench-upstream: meshca exited:" >&2; cat "meshca-$mode.log" >&2; exit 1; }
		curl -sf http://127.0.0.1:15014/readyz >/dev/null 2>&1 && break
		sleep 0.1
	done
	echo "== Vault backend, $mode mode ($(nproc) cores shared by Vault, meshca and the load generator)"
	# shellcheck disable=SC2086
	"$repo/bin/meshctl" bench --config "meshca-$mode.yaml" ${BENCH_ARGS:---concurrency 1,8,64 --duration 10s}
	kill $pid && wait $pid 2>/dev/null || true
	pid=
done
