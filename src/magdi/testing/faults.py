"""Fault-injection helpers shared by ``tests/test_reliability.py`` and ``benchmarks/reliability.py``.

A scriptable OpenAI-compatible teacher on 127.0.0.1, the agents that talk to it, and small process/file
helpers. The tests assert on the scenarios; the benchmark runs the same scenarios once and reports the
measured numbers. The benchmark imports this module by putting ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from magdi.backends_openai import OpenAIChatBackend
from magdi.cache import CallCache
from magdi.discussion import Agent
from magdi.testing.loopback import running

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
ITEM = re.compile(r"Item (\d+): what is (\d+) plus (\d+)\?")
#: a request for this item gets a 401 whose message echoes the credential (a careless server)
ECHO_KEY_ITEM = 99


def teacher_reply(model: str, messages: list[dict]) -> str:
    """Deterministic teacher: ``teacher-a`` is always right; ``teacher-b`` is stubborn on items i%4==0 (G2
    MAGs with max_rounds=2), wrong only in round 0 on i%4==1 (G1), right otherwise (G0)."""
    user = messages[-1]["content"]
    i, a, b = (int(g) for g in ITEM.search(user).groups())  # type: ignore[union-attr]
    discussing = "previous round" in user
    wrong = model == "teacher-b" and (i % 4 == 0 or (i % 4 == 1 and not discussing))
    ans = a + b + (1 if wrong else 0)
    return json.dumps({"reasoning": f"{a} plus {b} makes {ans}.", "answer": str(ans), "confidence": 0.9})


class Teacher(ThreadingHTTPServer):
    """``POST /v1/chat/completions`` on 127.0.0.1. Modes: ok (after ``delay`` s), 429 (forever, Retry-After 0),
    slow (sleeps past any client timeout), garbage (HTTP 200 whose body is not JSON). ``hold()`` parks new
    requests until ``release()``: what is parked when a client is killed was paid for and never received.
    ``items``/``auth`` record every request's item index and Authorization header."""

    daemon_threads = True

    def __init__(self, mode: str = "ok", delay: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), _TeacherHandler)
        self.mode, self.delay = mode, delay
        self.lock = threading.Lock()
        self.items: list[int] = []
        self.auth: list[str | None] = []
        self.gate = threading.Event()
        self.gate.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    @property
    def n(self) -> int:
        with self.lock:
            return len(self.items)

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()


class _TeacherHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Teacher

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        srv, auth = self.server, self.headers.get("Authorization")
        m = ITEM.search(req["messages"][-1]["content"])
        with srv.lock:
            srv.items.append(int(m.group(1)) if m else -1)
            srv.auth.append(auth)
        srv.gate.wait(timeout=60)
        try:
            if srv.mode == "429":
                self._send(429, b'{"error": {"message": "slow down", "type": "rate_limit"}}', {"Retry-After": "0"})
            elif srv.mode == "slow":
                time.sleep(1.5)
                self._send(200, b"{}")
            elif srv.mode == "garbage":
                self._send(200, b"<html><body>502 Bad Gateway (not JSON)</body></html>")
            elif m and int(m.group(1)) == ECHO_KEY_ITEM:
                self._send(401, json.dumps({"error": {"message": f"Incorrect API key provided: {auth}"}}).encode())
            else:
                time.sleep(srv.delay)
                text = teacher_reply(req["model"], req["messages"])
                body = {"id": "x", "object": "chat.completion", "created": 0, "model": req["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": len(text.split()), "total_tokens": 20}}
                self._send(200, json.dumps(body).encode())
        except (BrokenPipeError, ConnectionResetError):  # the client died or timed out
            pass


@contextmanager
def serve(mode: str = "ok", delay: float = 0.0) -> Iterator[Teacher]:
    with running(Teacher(mode, delay)) as srv:
        try:
            yield srv
        finally:
            srv.release()  # unblock handlers still parked before the server shuts down


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def examples(n: int) -> list[dict]:
    return [{"id": f"q{i:02d}", "question": f"Item {i}: what is {i} plus {i + 3}?", "choices": None,
             "answer": str(2 * i + 3), "explanation": None} for i in range(n)]


def teacher_agents(url: str, work: Path, retries: int = 2, timeout: float = 5.0) -> list[Agent]:
    return [Agent(name, OpenAIChatBackend(model, url, None, timeout_s=timeout, max_retries=retries,
                                          cache=CallCache(work / f"cache_{model}.jsonl"), backoff_base_s=0.01,
                                          max_backoff_s=0.05, concurrency=2),
                  "You are a careful reasoner.", 0.7, 0.95, seed, 64)
            for name, model, seed in (("a", "teacher-a", 1), ("b", "teacher-b", 2))]


def close_agents(agents: list[Agent]) -> None:
    for a in agents:
        a.backend.cache.close()  # type: ignore[union-attr]
        a.backend.close()  # type: ignore[union-attr]


def cache_snapshot(work: Path) -> dict[str, dict]:
    """Every cached call of every teacher cache file in ``work``."""
    out = {}
    for f in sorted(work.glob("cache_*.jsonl")):
        with CallCache(f) as c:
            out.update({f"{f.name}:{k}": c.get(k) for k in c})
    return out


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def n_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


# ============================================================================ a tiny student for kill tests
def tiny_student(dropout: float = 0.05):
    """(tokenizer, LoRA Llama, 8 MAGs): a WordLevel tokenizer over the MAGs' words and a hidden-32 Llama."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from magdi.mag import MAG, Node
    from magdi.student import ANSWER_FORMATS, attach_lora, student_target

    mags = []
    for i in range(8):
        a, b = i, i + 3
        nodes = [Node("x", 0, f"{a} plus {b} is {a + b}", str(a + b), 0.9, True),
                 Node("y", 0, f"{a} plus {b} is {a + b + 1}", str(a + b + 1), 0.6, False)]
        if i % 2:
            nodes += [Node("x", 1, f"still {a + b}", str(a + b), 0.9, True),
                      Node("y", 1, f"now {a + b}", str(a + b), 0.8, True)]
        mags.append(MAG(f"m{i}", "gsm8k", f"what is {a} plus {b} ?", str(a + b), nodes))
    corpus = [m.question for m in mags] + [ANSWER_FORMATS["number"], "user assistant : unknown"]
    corpus += [student_target(n.reasoning, n.answer) for m in mags for n in m.nodes]
    words = sorted({w for text in corpus for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)})
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant : {% endif %}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lm = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
            eos_token_id=1, bos_token_id=None))
        lm = attach_lora(lm, r=4, alpha=8, dropout=dropout, target_modules=["q_proj", "v_proj"])
    return tok, lm, mags


def train_cfg(epochs: int = 2):
    from magdi.config import TrainCfg

    return TrainCfg(epochs=epochs, lr=1e-2, mags_per_step=2, max_prompt_tokens=64, max_target_tokens=16,
                    hidden_dim=16, checkpoint_every=1, seed=0, bf16=False)  # a subprocess: no conftest fixture
