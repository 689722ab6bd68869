"""DVC stage `download`: benchmarks (mirror or hub) -> normalised, seeded train/test JSONL subsets."""

import argparse

from magdi.config import cli_params
from magdi.pipeline.prepare import stage_download

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    summary = stage_download(cli_params(ap.parse_args().params))
    for task, s in summary.items():
        print(f"{task:14s} {s['status']:8s} train={s.get('n_train', 0):<5} test={s.get('n_test', 0):<5} "
              f"malformed={s.get('n_malformed', 0)} {s.get('reason') or ''}")
