"""Choose the training recipe (learning rate, epochs, any ``train`` key) on a validation split, never on the test questions.

The validation questions are the next ``--n-val`` questions of the seeded training draw after the task's ``data.n_train``
that became MAGs (``magdi.data.sample_splits`` with a larger ``n_train``): disjoint from the MAG questions and
from the test set by construction. Every candidate is trained exactly as the ``train`` stage trains its
``--method`` (default magdi; several methods give one table, e.g. the levels ``magdi_r0 magdi_cn magdi_an
magdi``): same MAGs, ``train`` + the task's recipe + the candidate's lr/epochs. It is evaluated exactly as
``evaluate`` does (merged adapter, greedy, ``evaluate.*``); the base student's zero-shot accuracy on the same
questions is the baseline, with a paired bootstrap interval and McNemar's exact test for each candidate.

    python benchmarks/bench_recipe.py --task svamp --lrs 1e-4 3e-4 --epochs 1 --n-val 100 \\
        [--student qwen_coder_0_5b] [--method magdi] [--out reports/benchmark_recipe_svamp.md]
    python benchmarks/bench_recipe.py --task svamp --lrs 3e-4 --set node_repr=live,frozen weights.graph=1.0,0.1

``--set KEY=V1,V2`` adds a grid axis over any ``train`` key (dotted for nested keys, values read as YAML
scalars); the candidates are every combination, validated as the ``train`` section is. Ties in validation
accuracy go to the smaller learning rate, then to the candidate listed first (the first value of each axis),
so put the current setting first. ``--candidates "K=V K2=V2" "K=V3 K2=V4"`` lists the candidates one by one
instead (e.g. the current setting and another task's winner), in the same tie order.

Run it where ``dvc repro`` has built the task's MAGs and the student (``data/mags``, ``models/``). Adapters go to
``runs/bench_recipe/<task>/<student>/<method>/`` (resumable: a finished candidate is not trained again; an
evaluation is reused only if it was made on the same validation questions).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from magdi.config import _deep_merge  # noqa: E402  (the merge train_with applies to every override)


def validation_questions(p, task: str, n_val: int) -> list[dict]:
    """The ``n_val`` questions that follow the MAG questions in the seeded draw (same pools, same seed)."""
    from magdi.data import load_benchmark, read_jsonl, sample_splits
    from magdi.pipeline import bench_file

    pools, _ = load_benchmark(task, p.data.source, p.paths.mirror_dir)
    draw = sample_splits(pools, p.data.train_size(task) + n_val, p.data.n_test, p.data.seed)
    mag_ids = {r["id"] for r in read_jsonl(bench_file(p, task, "train"))}
    test_ids = {r["id"] for r in draw["test"]}
    first = [r["id"] for r in draw["train"][: p.data.train_size(task)]]
    if set(first) != mag_ids:
        raise SystemExit(f"{bench_file(p, task, 'train')} is not the first data.n_train={p.data.train_size(task)} of the "
                         "seeded draw: run `dvc repro download` with these params first")
    val = draw["train"][p.data.train_size(task):]
    assert not ({r["id"] for r in val} & (mag_ids | test_ids)), "validation overlaps MAG or test questions"
    return val


def evaluate_on(p, adapter: Path | None, task: str, questions: list[dict], limit: int | None = None):
    """``evaluate``'s decoding of ``questions`` (``limit``: new tokens, default the task's own limit)."""
    from magdi.config import TASK_TYPES
    from magdi.evaluate import evaluate_examples
    from magdi.pipeline import _student_generator, decoding

    generator, tok = _student_generator(p, adapter)
    t0 = time.perf_counter()
    preds = evaluate_examples(generator, tok, questions, task, TASK_TYPES[task], p.evaluate.batch_size,
                              limit or p.evaluate.limit(task), "", k=1, **decoding(p, 1))
    return preds, time.perf_counter() - t0


def bare_answer(text: str) -> bool:
    """An answer with (almost) no reasoning: fewer than 5 words before its final "The answer is" (e.g. "The answer
    is 12."), the pattern found in the MAGDi student's GSM8K outputs (issue on the whole paper, item 4)."""
    head = text.rsplit("The answer is", 1)[0] if "The answer is" in text else text
    return len(head.split()) < 5


def _scalar(text: str):
    """A YAML scalar, with ``1e-4`` read as a number (YAML 1.1, hence PyYAML, wants ``1.0e-4``)."""
    import yaml

    val = yaml.safe_load(text)
    if isinstance(val, str):
        try:
            return float(val)
        except ValueError:
            return val
    return val


def parse_grid(items: list[str]) -> list[dict]:
    """``["a.b=1,2", "c=x"]`` -> every combination as nested override dicts, in the order written (first value first).

    Values are parsed with ``yaml.safe_load`` (numbers, booleans, strings), never evaluated."""
    axes = []
    for item in items:
        key, sep, vals = item.partition("=")
        if not sep or not key or not vals:
            raise SystemExit(f"--set {item!r}: expected KEY=V1[,V2...]")
        if key in ("lr", "epochs"):
            raise SystemExit(f"--set {item!r}: the learning rate and epochs have their own flags (--lrs, --epochs)")
        axes.append([(key, _scalar(v)) for v in vals.split(",")])
    return [functools.reduce(_deep_merge, (_nested(key, val) for key, val in combo), {})
            for combo in itertools.product(*axes)]


def _nested(key: str, val) -> dict:
    """``("weights.graph", 0.1)`` -> ``{"weights": {"graph": 0.1}}``, an override as ``train_with`` takes it."""
    for k in reversed(key.split(".")):
        val = {k: val}
    return val


def parse_candidates(items: list[str]) -> list[dict]:
    """``["a=1 b.c=2", "a=3 b.c=4"]`` -> one nested override dict per string (each string one ``--set`` row)."""
    out = []
    for item in items:
        if "," in item:
            raise SystemExit(f"--candidates {item!r}: one value per key (a grid is --set)")
        out += parse_grid(item.split())  # one value per axis: a grid of exactly one candidate
    return out


def grid_label(over: dict, prefix: str = "") -> str:
    """``weights.graph=0.1 node_repr=frozen``: the candidate's overrides, flattened (also its resume folder)."""
    parts = []
    for k, v in over.items():
        parts += [grid_label(v, f"{prefix}{k}.")] if isinstance(v, dict) else [f"{prefix}{k}={v}"]
    return " ".join(parts)


def candidate_cfg(p, task: str, method: str, overrides: dict):
    """(base method, training config) of one candidate: what the ``train`` stage resolves for ``method`` on ``task``
    (``train``, the task's recipe, the ablation's overrides), with ``overrides`` deep-merged on top, so a candidate
    that sets only ``weights.graph`` keeps the task's other weights."""
    base, cfg0 = p.train_for(method, task)
    return base, p.train_with(overrides, "--candidate", cfg0)


def train_candidate(p, task: str, base: str, cfg, out: Path) -> dict:
    """One ``train``-stage run of ``base`` with the resolved ``cfg``, adapter saved under ``out``."""
    import torch

    from magdi.pipeline import _select_mags
    from magdi.student import attach_lora, load_student
    from magdi.train import build_items, method_spec, save_adapter, train

    spec = method_spec(base)
    mags = _select_mags(p, task, cfg)
    torch.manual_seed(cfg.seed)
    lm, tok = load_student(p.paths.student_dir, p.student.dtype, p.student.trust_remote_code)
    lm = attach_lora(lm, p.student.lora.r, p.student.lora.alpha, p.student.lora.dropout, p.student.lora.target_modules)
    items = build_items(mags, spec, tok, cfg.graph)
    res = train(lm, tok, items, spec, cfg, out)
    save_adapter(lm, out / "adapter")
    return {"n_mags": len(mags), "steps": res.steps, "tokens": res.tokens, "seconds": round(res.seconds, 1),
            "final_loss": res.history[-1]["loss"] if res.history else None, "train": cfg.model_dump()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--task", required=True)
    ap.add_argument("--method", nargs="+", default=["magdi"],
                    help="one or more training methods (e.g. the levels magdi_r0 magdi_cn magdi_an magdi, or sit_<agent>)")
    ap.add_argument("--student", default=None, help="one of experiments.scaling_students (default: the main student)")
    ap.add_argument("--lrs", type=float, nargs="+", required=True)
    ap.add_argument("--epochs", type=int, nargs="+", default=None)
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=V1,V2",
                    help="grid axis over a train key, e.g. node_repr=live,frozen weights.graph=1.0,0.1")
    ap.add_argument("--candidates", nargs="+", default=[], metavar="'KEY=V KEY2=V2'",
                    help="explicit candidates instead of a --set grid, one quoted string of KEY=V each")
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--workdir", default="runs/bench_recipe")
    ap.add_argument("--out", default=None, help="default: reports/benchmark_recipe_<task>.md")
    a = ap.parse_args()
    a.out = a.out or f"reports/benchmark_recipe_{a.task}.md"

    import torch
    from peak import machine_line  # benchmarks/peak.py, beside this script

    from magdi.config import cli_params
    from magdi.pipeline import _set_threads
    from magdi.report.stats import mcnemar_exact, paired_bootstrap_ci

    _set_threads()
    p = cli_params(a.params)
    if a.student:
        p = p.for_student(a.student)
    val = validation_questions(p, a.task, a.n_val)
    work = Path(a.workdir) / a.task / (a.student or p.student.model)
    work.mkdir(parents=True, exist_ok=True)
    ids = [r["id"] for r in val]

    def cached_eval(name: str, adapter: Path | None) -> dict:
        """An evaluation on exactly these validation questions, reused only if it was made on the same ids."""
        f = work / f"{name}.eval.json"
        cached = json.loads(f.read_text()) if f.exists() else {}
        if cached.get("ids") == ids:
            return cached
        preds, secs = evaluate_on(p, adapter, a.task, val)
        row = {"ids": ids, "correct": [pr.correct for pr in preds], "tokens": [pr.n_tokens for pr in preds],
               "bare": [bare_answer(pr.output) for pr in preds], "seconds": round(secs, 1)}
        f.write_text(json.dumps(row))
        return row

    base = cached_eval("zero_shot", None)
    rows = []
    if a.set and a.candidates:
        raise SystemExit("--set and --candidates: give one of them")
    grid = parse_candidates(a.candidates) if a.candidates else parse_grid(a.set)
    for method, ep, lr, (gi, over) in itertools.product(a.method, a.epochs or [None], a.lrs, enumerate(grid)):
        # without --epochs: the run's own epochs (its task recipe's)
        base_method, cfg = candidate_cfg(p, a.task, method, {**over, "lr": lr, **({"epochs": ep} if ep else {})})
        ep, label = cfg.epochs, grid_label(over)
        # a candidate's folder is its method, lr, epochs and overrides; its adapter is reused only if it was trained
        # with this very config (a later edit of params, e.g. a task recipe, retrains it)
        name = f"{method}/lr{lr:g}_ep{ep}" + "".join(f"_{x}" for x in label.split())
        out = work / name
        tf = out / "bench_train.json"
        if not tf.exists() or json.loads(tf.read_text()).get("train") != json.loads(json.dumps(cfg.model_dump())):
            (work / f"{name}.eval.json").unlink(missing_ok=True)
            torch.manual_seed(0)
            info = train_candidate(p, a.task, base_method, cfg, out)
            tf.write_text(json.dumps(info))
        info = json.loads(tf.read_text())
        ev = cached_eval(name, out / "adapter")
        lo, hi = paired_bootstrap_ci(ev["correct"], base["correct"], p.evaluate.bootstrap_samples, p.evaluate.seed)
        b, c, pv = mcnemar_exact(ev["correct"], base["correct"])
        rows.append({"method": method, "lr": lr, "epochs": ep, "set": label, "order": gi, **info, "acc": 100 * sum(ev["correct"]) / len(val),
                     "diff": 100 * (sum(ev["correct"]) - sum(base["correct"])) / len(val),
                     "ci": (100 * lo, 100 * hi), "p": pv,
                     "truncated": 100 * sum(t >= p.evaluate.limit(a.task) for t in ev["tokens"]) / len(val),
                     "mean_tokens": sum(ev["tokens"]) / len(val), "eval_s": ev["seconds"],
                     "bare": None if "bare" not in ev else 100 * sum(ev["bare"]) / len(val)})

    zs_acc = 100 * sum(base["correct"]) / len(val)
    best = {m: max((r for r in rows if r["method"] == m), key=lambda r: (r["acc"], -r["lr"], -r["order"])) for m in a.method}
    lines = [
        f"# Training recipe chosen on a validation split ({a.task}, {', '.join(a.method)}, student "
        f"{a.student or p.student.model})",
        "",
        f"`python benchmarks/bench_recipe.py --task {a.task} --method {' '.join(a.method)}"
        + (f" --student {a.student}" if a.student else "")
        + f" --lrs {' '.join(f'{x:g}' for x in a.lrs)}"
        + (f" --epochs {' '.join(map(str, a.epochs))}" if a.epochs else "")
        + (f" --set {' '.join(a.set)}" if a.set else "")
        + (" --candidates " + " ".join(f"'{c}'" for c in a.candidates) if a.candidates else "") + f" --n-val {a.n_val}`",
        f"on {platform.machine()} with {torch.get_num_threads()} threads; `train` and `evaluate` as in params, "
        "each candidate changing only the learning rate, epochs" + (" and the keys of `--set`/`--candidates`." if a.set or a.candidates else "."),
        "",
        machine_line(),
        "",
        f"Validation: {len(val)} {a.task} training-pool questions after the {p.data.train_size(a.task)} MAG questions of the "
        "seeded draw (disjoint from the MAGs and the test set). The base student zero-shot on them: "
        f"{zs_acc:.1f} % ({base['seconds']:.0f} s).",
        "",
        "| method | lr | epochs | set | MAGs | steps | train tokens | train s | final loss | val acc % "
        "| vs zero-shot (paired 95 % CI) | McNemar p | truncated % | mean tokens | bare answers % |",
        "|:---|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['epochs']} | {r['set'] or '-'} | {r['n_mags']} | {r['steps']} | {r['tokens']} | {r['seconds']:.0f} "
                     f"| {r['final_loss']:.3f} | {r['acc']:.1f} | {r['diff']:+.1f} [{r['ci'][0]:+.1f}, {r['ci'][1]:+.1f}] "
                     f"| {r['p']:.3g} | {r['truncated']:.1f} | {r['mean_tokens']:.0f} | "
                     + ("—" if r["bare"] is None else f"{r['bare']:.1f}") + " |")
    lines += [""] + [f"Highest validation accuracy of {m}: lr {b['lr']:g}, {b['epochs']} epoch(s)"
                     + (f", {b['set']}" if b["set"] else "") + f" ({b['acc']:.1f} %; ties go to the smaller learning "
                     "rate, then to the candidate listed first)." for m, b in best.items()]
    if "bare" in base:
        lines += ["", f"bare answers = outputs with fewer than 5 words before their final \"The answer is\" "
                  f"(`bare_answer`); the base student zero-shot: {100 * sum(base['bare']) / len(val):.1f} %."]
    lines += ["", "With this many questions a difference of a few points is within noise: read the intervals."]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
