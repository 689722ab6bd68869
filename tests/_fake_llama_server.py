#!/usr/bin/env python3
"""A stand-in for llama.cpp's `llama-server` binary: same flags, same /health and chat endpoint shape.

It continues a trailing assistant message (prefill) the way llama-server does: the reply content is only
the continuation. Each request is appended as JSON to $FAKE_LLAMA_LOG so tests can see what was sent.
"""

import argparse
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--host", default="127.0.0.1")
for flag in ("--parallel", "--ctx-size", "--threads", "--threads-batch"):
    ap.add_argument(flag)
ap.add_argument("--no-webui", action="store_true")
ap.add_argument("--jinja", action="store_true")
ap.add_argument("--no-repack", action="store_true")
args = ap.parse_args()
if os.environ.get("FAKE_LLAMA_FAIL"):
    raise SystemExit(3)


class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, {"status": "ok"}) if self.path == "/health" else self._send(404, {})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if os.environ.get("FAKE_LLAMA_LOG"):
            with open(os.environ["FAKE_LLAMA_LOG"], "a") as f:
                f.write(json.dumps({"model_file": args.model, **req}) + "\n")
        prefill = req["messages"][-1]["content"] if req["messages"][-1]["role"] == "assistant" else ""
        q = req["messages"][-2 if prefill else -1]["content"]
        if os.environ.get("FAKE_LLAMA_NO_ECHO"):  # servers that return only the continuation
            prefill = ""
        text = prefill + f'{q[:20]}", "answer": "42", "confidence": 0.9}}'  # llama-server: prefill + continuation
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}})


ThreadingHTTPServer((args.host, args.port), H).serve_forever()
