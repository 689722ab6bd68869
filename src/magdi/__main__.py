"""``python -m magdi <command>``: questions a user asks the pipeline without running a stage.

- ``precision [--json] [--params params.yaml]``: what the precision settings (``auto`` or explicit) resolve to on
  this machine, and why (``magdi.precision``).
- ``show-runs [-S key=value ...] [--json]``: every run ``dvc.yaml`` defines with its resolved configuration; with
  ``-S`` edits (DVC's syntax, as ``dvc exp run -S``), the runs they change and how (``magdi.runs``).
"""

from __future__ import annotations

import argparse
import json
import sys


def _precision(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_params
    from .precision import summary

    try:
        p = load_params(args.params, check_mirror=False)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    teachers = {a.name: a.dtype or p.student.generation_dtype or p.student.dtype
                for a in p.teachers.agents if a.backend == "local"}
    s = summary(p.train.bf16, p.student.generation_dtype or p.student.dtype, teachers)
    if args.json:
        print(json.dumps(s, indent=2, sort_keys=True))
        return 0
    print(f"CPU class: {s['cpu_class']}")
    for what in ("train", "generate"):
        print(f"{what:9s} {s['reasons'][what]}")
    for agent in teachers:
        print(f"teacher {agent}: {s['reasons'][f'teacher {agent}']}")
    return 0


def _show_runs(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .runs import changes, load, table

    try:
        base, _ = load(args.params, args.dvc)
        after, _ = load(args.params, args.dvc, args.set) if args.set else (base, None)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    diff = changes(base, after) if args.set else {}
    if args.json:
        print(json.dumps([{**r.as_dict(), **({"changes": diff.get(r.stage, [])} if args.set else {})}
                          for r in after], indent=2, sort_keys=True))
        return 0
    if not args.set:
        print(table(after))
        print(f"\n{sum(r.kind == 'train' for r in after)} training runs, "
              f"{sum(r.kind == 'evaluate' for r in after)} evaluations, {len(after)} stages (--json: everything)")
        return 0
    if not diff:
        print(f"{' '.join(args.set)}: changes no run")
        return 0
    print(f"{' '.join(args.set)} changes {len(diff)} of {len(after)} stages:")
    for stage, what in diff.items():
        print(f"  {stage}: {'; '.join(what)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m magdi", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("precision", help="what `auto` (and every explicit precision) resolves to on this machine")
    pr.add_argument("--json", action="store_true", help='{"train", "generate", "teachers", ...} as JSON')
    pr.add_argument("--params", default="params.yaml")
    pr.set_defaults(fn=_precision)
    sr = sub.add_parser("show-runs", help="every run of the pipeline, resolved; with -S, the runs an edit changes")
    sr.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a params edit in DVC's syntax (repeatable), e.g. -S train.weights.contrastive=0.5")
    sr.add_argument("--json", action="store_true", help="a list of {stage, task, method, train, ...} objects")
    sr.add_argument("--params", default="params.yaml")
    sr.add_argument("--dvc", default="dvc.yaml")
    sr.set_defaults(fn=_show_runs)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
