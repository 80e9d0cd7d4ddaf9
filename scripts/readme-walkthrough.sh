#!/usr/bin/env bash
# Runs the README's walk-through verbatim against a fresh `serve --dev` and checks what it printed.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
export G2W_DATABASE_URL="sqlite://$work/walkthrough.db"
cargo build --release --quiet
./target/release/g2w-webhooks serve --dev >"$work/serve.out" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do
  curl -sf http://127.0.0.1:8080/readyz >/dev/null && break
  sleep 0.1
done
sed -n '/<!-- walkthrough:start -->/,/<!-- walkthrough:end -->/p' README.md | sed '1,2d;$d' | sed '$d' >"$work/walk.sh"
bash -euo pipefail "$work/walk.sh" >"$work/out.txt" 2>&1 || { cat "$work/out.txt"; exit 1; }
cat "$work/out.txt"
grep -q "registrant.added .* \[signature ok\]" "$work/out.txt"
test "$(grep -cE '^(204|202)$' "$work/out.txt")" -eq 4
echo "walk-through OK"
