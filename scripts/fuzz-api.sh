#!/usr/bin/env bash
# Property-based API fuzzing against the GoTo contract (schemathesis): a dev server on a fresh database must
# answer no 5xx and nothing that breaks the contract's schemas or content types.
set -euo pipefail
cd "$(dirname "$0")/.."
examples="${1:-50}"
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cargo build --quiet
./target/debug/g2w-webhooks serve --dev --database-url "sqlite://$work/fuzz.db" --listen "127.0.0.1:$port" \
  >"$work/serve.out" 2>"$work/serve.err" &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
  sleep 0.1
done
token=$(grep -o 'g2wdev_[0-9a-f]*' "$work/serve.out" | head -n1)
schemathesis run spec/gotowebinar-webhooks-openapi.yml \
  --url "http://127.0.0.1:$port/G2W/rest/v2" \
  -H "Authorization: Bearer $token" \
  --checks not_a_server_error,response_schema_conformance,content_type_conformance \
  --max-examples "$examples" --seed 1
if grep -q "panicked" "$work/serve.err"; then
  echo "the server panicked during fuzzing" >&2
  exit 1
fi
