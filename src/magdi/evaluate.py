"""Evaluation: the student answers each test question alone (heads dropped), we parse and score.

Accuracy comes with a 95% bootstrap interval (tiny CPU test sets are noisy, so say how noisy);
generated tokens per question are the efficiency metric of Table 2. Every prediction is saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from .scoring import extract_answer, is_correct, majority_vote
from .student import Generation, generate, student_prompt

#: ``(prompts, max_new_tokens, temperature, top_p, seed, num_samples, top_k) -> [Generation]``, prompt-major.
Generator = Callable[..., list[Generation]]


def hf_generator(model, tokenizer) -> Generator:
    """The transformers backend (``student.generate``) as a ``Generator``; ``magdi.backends_vllm`` is the other."""
    return partial(generate, model, tokenizer)


def numerics_fingerprint(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """What greedy decoding's exact tokens depend on besides weights and prompts: the kernels the matrix
    products run. oneDNN picks them by processor (AMX tiles or AVX-512 BF16 instructions round bf16 products
    differently, and greedy decoding turns that into other answers: reports/benchmark_eval_numerics.md) unless
    ``ONEDNN_MAX_CPU_ISA`` caps it, so each evaluation records them: two runs that disagree can then be told
    apart from a code change."""
    import torch

    out: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                 "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
                 "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if torch.cuda.is_available():
        out["cuda_device"] = torch.cuda.get_device_name()
    try:
        first = cpuinfo.read_text().split("\n\n", 1)[0]
    except OSError:
        return out
    fields = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in first.splitlines() if ":" in ln)}
    out.update(cpu_model=fields.get("model name"), cpu_family_model=f"{fields.get('cpu family')}/{fields.get('model')}",
               cpu_matrix_flags=sorted(f for f in fields.get("flags", "").split()
                                       if f.startswith(("amx", "avx512_bf16", "avx512_fp16"))))
    return out


@dataclass
class Prediction:
    id: str
    task: str
    output: str
    parsed: str | None
    gold: str
    correct: bool
    n_tokens: int
    samples: list[str] | None = None
    #: the question text, so a predictions file (and its MLflow artifact) reads on its own
    question: str = ""


def bootstrap_ci(correct: Sequence[bool], samples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean."""
    n = len(correct)
    if n == 0:
        return (0.0, 0.0)
    rng = random.Random(seed)
    vals = [float(c) for c in correct]
    means = sorted(sum(rng.choices(vals, k=n)) / n for _ in range(samples))
    return (means[int(0.025 * (samples - 1))], means[int(0.975 * (samples - 1))])


def evaluate_examples(
    generator: Generator,
    tokenizer,
    examples: list[dict],
    task: str,
    answer_type: str,
    batch_size: int,
    max_new_tokens: int,
    prefix: str = "",
    k: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    top_k: int = 0,
) -> list[Prediction]:
    """Greedy (k=1, T=0) or self-consistency (k seeded samples per question, majority vote) evaluation.

    With k > 1 all samples of a batch come from one sampling call (see ``magdi.student.generate``).
    """
    preds: list[Prediction] = []
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["question"]))  # less padding
    bar = tqdm(total=len(examples), desc=f"eval {task}", unit="q")
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        prompts = [student_prompt(tokenizer, ex, answer_type, prefix) for ex in chunk]
        gens = generator(prompts, max_new_tokens, temperature, top_p, seed + start, num_samples=k, top_k=top_k)
        for j, ex in enumerate(chunk):
            outs = gens[j * k : (j + 1) * k]
            parsed = [extract_answer(g.text, answer_type, ex.get("choices")) for g in outs]
            final = parsed[0] if k == 1 else majority_vote(parsed, answer_type)
            preds.append(Prediction(
                id=ex["id"], task=task, output=outs[0].text, parsed=final, gold=ex["answer"],
                correct=is_correct(final, ex["answer"], answer_type),
                n_tokens=sum(g.n_tokens for g in outs),
                samples=[g.text for g in outs] if k > 1 else None, question=ex["question"],
            ))
        bar.update(len(chunk))
    bar.close()
    by_id = {p.id: p for p in preds}
    return [by_id[ex["id"]] for ex in examples]


def summarise(preds: list[Prediction], bootstrap_samples: int, seed: int, max_new_tokens: int | None = None) -> dict:
    """Accuracy with its bootstrap interval; with ``max_new_tokens``, also the share of outputs cut off by it
    (an output that stopped at the limit may have lost its answer line: the limit is chosen to keep this small)."""
    correct = [p.correct for p in preds]
    lo, hi = bootstrap_ci(correct, bootstrap_samples, seed)
    n = len(preds)
    return {
        "n": n,
        "accuracy": sum(correct) / n if n else 0.0,
        "ci95_low": lo,
        "ci95_high": hi,
        "mean_tokens": sum(p.n_tokens for p in preds) / n if n else 0.0,
        "unparsed": sum(p.parsed is None for p in preds),
        **({"truncated_fraction": sum(p.n_tokens >= max_new_tokens for p in preds) / n if n else 0.0}
           if max_new_tokens is not None else {}),
    }


def outputs_digest(preds: Sequence[Prediction]) -> str:
    """sha256 of the (question id, output text, samples) of every prediction, in order: whether two runs
    decoded exactly alike, read from their metrics alone (the predictions files are not committed), which the
    accuracy cannot say (it may not move when outputs do). Equal digests: identical texts (token counts are
    not hashed). Different digests under an equal ``numerics_fingerprint``: something the fingerprint does not
    capture differed (code, params, inputs, process state)."""
    h = hashlib.sha256()
    for p in preds:
        h.update(json.dumps([p.id, p.output, p.samples], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def prediction_rows(preds: list[Prediction]) -> list[dict]:
    return [asdict(p) for p in preds]
