"""DVC stage `download`: benchmarks (mirror or hub) -> normalised, seeded train/test JSONL subsets."""

# ruff: noqa: E402 -- delegate() comes first: in a warm server (magdi.warm) the imports below are pre-loaded
from magdi.warm import delegate

delegate(__file__)

import argparse

from magdi.config import cli_params
from magdi.pipeline import stage_download

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    summary = stage_download(cli_params(ap.parse_args().params))
    for task, s in summary.items():
        print(f"{task:14s} {s['status']:8s} train={s.get('n_train', 0):<5} test={s.get('n_test', 0):<5} "
              f"malformed={s.get('n_malformed', 0)} {s.get('reason') or ''}")
