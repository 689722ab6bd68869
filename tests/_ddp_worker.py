"""One rank of a real multi-process DDP run on the CPU (gloo), started by tests/test_train.py through torchrun.

Each rank trains the same tiny student on the same MAGs through ``magdi.train.train`` and writes what it saw to
``<out>/rank<r>.json``: the launch's view of it (``magdi.launch``), its trained LoRA weights, the run's counts and
losses, and the error a resume from different steps raised. Not a test itself (no ``test_`` prefix).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from conftest import build_lm, build_tokenizer
from magdi.launch import is_main_process, launched_processes
from magdi.train import build_items, method_spec, train
from test_train import _ddp_cfg, _ddp_mags, _lora


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    tok = build_tokenizer()
    spec = method_spec("magdi")
    items = build_items(_ddp_mags(), spec, tok)
    report = {"rank": rank, "main": is_main_process(), "world": launched_processes()}
    # rank 0 finds the checkpoint the test left in its folder, rank 1 an empty folder: refused on every rank
    try:
        train(build_lm(tok), tok, items, spec, _ddp_cfg(), out / f"resume{rank}")
    except RuntimeError as e:
        report["resume_error"] = str(e)
    lm = build_lm(tok)
    res = train(lm, tok, items, spec, _ddp_cfg(), out / "run")
    report.update(steps=res.steps, tokens=res.tokens, sequences=res.n_unique_sequences, history=res.history,
                  lora={k: v.tolist() for k, v in _lora(lm).items()})
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
