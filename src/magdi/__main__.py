"""``python -m magdi <command>``: questions a user asks the pipeline without running a stage.

- ``precision [--json] [--params params.yaml]``: what the precision settings (``auto`` or explicit) resolve to on
  this machine, and why (``magdi.precision``).
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m magdi", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("precision", help="what `auto` (and every explicit precision) resolves to on this machine")
    pr.add_argument("--json", action="store_true", help='{"train", "generate", "teachers", ...} as JSON')
    pr.add_argument("--params", default="params.yaml")
    pr.set_defaults(fn=_precision)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
