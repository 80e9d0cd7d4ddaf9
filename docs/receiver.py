#!/usr/bin/env python3
"""A minimal GoToWebinar webhook receiver that verifies every delivery.

    python3 docs/receiver.py --port 4000 --secret "$SECRET"

Answers the callback-validation GET with 200, checks X-Webhook-Signature on each POST, prints the event, and
answers 200 (or 401 when the signature does not hold). Standard library only.
"""
import argparse
import base64
import hashlib
import hmac
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """X-Webhook-Signature = base64(HMAC-SHA256(secret, timestamp + ":" + raw body))."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b":" + body, hashlib.sha256)
    expected = base64.b64encode(mac.digest()).decode()
    return hmac.compare_digest(expected, signature)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=4000)
    parser.add_argument("--secret", action="append", default=[], help="secret key (repeat for rotation)")
    args = parser.parse_args()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # the callback validation probe
            self.send_response(200)
            self.end_headers()

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            ts = self.headers.get("X-Webhook-Signature-Timestamp", "")
            sig = self.headers.get("X-Webhook-Signature")
            if sig is None:
                verdict = "unsigned"
            elif any(verify(s, ts, body, sig) for s in args.secret):
                verdict = "signature ok"
            else:
                verdict = "BAD SIGNATURE"
            event = json.loads(body)
            print(f"{event.get('eventName')} {event.get('eventKey')} [{verdict}] {body.decode()}", flush=True)
            self.send_response(401 if verdict == "BAD SIGNATURE" else 200)
            self.end_headers()

        def log_message(self, *_):
            pass

    print(f"receiving on http://127.0.0.1:{args.port}/", file=sys.stderr, flush=True)
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
