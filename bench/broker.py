#!/usr/bin/env python3
"""The credential broker's overhead per model call (specs/agents.md §5): the same streamed calls to a
fake OpenAI-compatible upstream on loopback, made directly and through swarm.py's CredentialBroker.

    python bench/broker.py [--calls 300] [--events 20] [--warmup 20] [--json-out FILE]

Both run in this process (the broker's threads as in a worker; the upstream a ThreadingHTTPServer), one
call at a time over a new connection each, as an SDK with `Connection: close` does. For each call:
time to the first byte of the answer (TTFB) and to its last byte (total). Prints p50 and p99 of both,
direct and brokered, and what the broker adds; then one JSON line with everything.
"""

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import swarm  # noqa: E402

KEY, TOKEN = "sk-bench-real-key", "swarm-bench-token"


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = [{"choices": [{"delta": {"content": f"word{i} "}}]} for i in range(self.server.events)]
        events.append({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": self.server.events}})
        for event in events:
            data = f"data: {json.dumps(event)}\n\n".encode()
            self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args):
        pass


def call(port, headers, body):
    """-> (seconds to the first byte of the answer's body, seconds to its end)."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
    answer = conn.getresponse()
    first = answer.read1(65536)
    ttfb = time.perf_counter() - start
    while first:
        first = answer.read1(65536)
    total = time.perf_counter() - start
    conn.close()
    assert answer.status == 200, answer.status
    return ttfb, total


def percentiles(values):
    ordered = sorted(values)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 3),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--events", type=int, default=20, help="SSE events in each answer")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--json-out")
    args = p.parse_args()
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    upstream.daemon_threads, upstream.events = True, args.events
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = upstream.server_address[1]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    broker = swarm.CredentialBroker(listener, {"provider": "openai", "base_url": f"http://127.0.0.1:{port}/v1",
                                               "model": "bench-model"}, KEY, TOKEN, lambda line: None)
    broker.start()
    body = json.dumps({"model": "bench-model", "stream": True,
                       "messages": [{"role": "user", "content": "x" * 2000}]}).encode()
    runs = {"direct": (port, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}),
            "brokered": (listener.getsockname()[1], {"Authorization": f"Bearer {TOKEN}",
                                                     "Content-Type": "application/json"})}
    results = {}
    try:
        for name, (target, headers) in runs.items():
            for _ in range(args.warmup):
                call(target, headers, body)
            samples = [call(target, headers, body) for _ in range(args.calls)]
            results[name] = {"ttfb": percentiles([s[0] for s in samples]),
                             "total": percentiles([s[1] for s in samples])}
    finally:
        broker.close()
        upstream.shutdown()
    added = {part: {k: round(results["brokered"][part][k] - results["direct"][part][k], 3)
                    for k in ("p50_ms", "p99_ms")} for part in ("ttfb", "total")}
    machine = {"nproc": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()}
    print(f"machine: {machine}; {args.calls} calls each, {args.events} SSE events per answer")
    for name in runs:
        r = results[name]
        print(f"{name:9} TTFB p50 {r['ttfb']['p50_ms']:.2f} ms p99 {r['ttfb']['p99_ms']:.2f} ms;"
              f" total p50 {r['total']['p50_ms']:.2f} ms p99 {r['total']['p99_ms']:.2f} ms")
    print(f"added    TTFB p50 {added['ttfb']['p50_ms']:.2f} ms p99 {added['ttfb']['p99_ms']:.2f} ms;"
          f" total p50 {added['total']['p50_ms']:.2f} ms p99 {added['total']['p99_ms']:.2f} ms")
    line = json.dumps({"bench": "broker", "machine": machine, "calls": args.calls, "events": args.events,
                       **results, "added": added, "usage_counted": broker.report()["output_tokens"]})
    print(line)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")


if __name__ == "__main__":
    main()
