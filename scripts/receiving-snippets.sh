#!/usr/bin/env bash
# Runs the Python and Node.js receivers of docs/receiving.md, as written there, against real signed deliveries.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$work"' EXIT
extract() { # the code block after <!-- snippet:NAME -->
  awk -v tag="<!-- snippet:$1 -->" '$0==tag{f=1;next} f&&/^```/{if(in_block){exit}in_block=1;next} f&&in_block{print}' docs/receiving.md
}
extract python >"$work/receiver.py"
extract node >"$work/receiver.js"
test -s "$work/receiver.py" && test -s "$work/receiver.js"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cargo build --release --quiet
bin=./target/release/g2w-webhooks
export G2W_DATABASE_URL="sqlite://$work/snippets.db"
$bin serve --dev --listen "127.0.0.1:$port" >"$work/serve.out" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
eval "$($bin dev-tokens)"
api="http://127.0.0.1:$port/G2W/rest/v2"
export G2W_SECRET=$(curl -sf -X POST -H "Authorization: Bearer $G2W_TOKEN" "$api/webhooks/secretkey" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["value"])')
python3 "$work/receiver.py" 4101 >"$work/python.out" 2>&1 &
pids+=($!)
node "$work/receiver.js" 4102 >"$work/node.out" 2>&1 &
pids+=($!)
sleep 1
for p in 4101 4102; do
  key=$(curl -sf -X POST -H "Authorization: Bearer $G2W_TOKEN" -H 'Content-Type: application/json' "$api/webhooks" \
    -d "[{\"product\":\"g2w\",\"eventName\":\"registrant.added\",\"eventVersion\":\"1.0.0\",\"callbackUrl\":\"http://127.0.0.1:$p/hook\"}]" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["_embedded"]["webhooks"][0]["webhookKey"])')
  curl -sf -X PUT -H "Authorization: Bearer $G2W_TOKEN" -H 'Content-Type: application/json' "$api/webhooks" \
    -d "[{\"webhookKey\":\"$key\",\"state\":\"ACTIVE\"}]"
  curl -sf -X POST -H "Authorization: Bearer $G2W_TOKEN" -H 'Content-Type: application/json' "$api/userSubscriptions" \
    -d "[{\"webhookKey\":\"$key\"}]" >/dev/null
done
$bin trigger registrant.added --organizer 1000 --server "http://127.0.0.1:$port" >/dev/null
for _ in $(seq 1 50); do
  grep -q "verified registrant.added" "$work/python.out" && grep -q "verified registrant.added" "$work/node.out" && break
  sleep 0.1
done
echo "python: $(cat "$work/python.out")"
echo "node:   $(cat "$work/node.out")"
grep -q "verified registrant.added" "$work/python.out"
grep -q "verified registrant.added" "$work/node.out"
echo "receiving snippets OK"
