"""DVC stage `report`: the paper's tables and figures, the paired significance tests and the HTML MAG browser and
predictions pages in reports/, from metrics/, data/mags and runs/eval."""

import argparse
from pathlib import Path

from magdi.config import cli_params
from magdi.report import build_report

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    a = ap.parse_args()
    p = cli_params(a.params)
    for path in build_report(p, Path(p.paths.reports_dir)):
        print(path)
