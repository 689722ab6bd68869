"""DVC stage `build_mags`: teachers discuss each training question (ReConcile) -> one MAG per question."""

import argparse
import json

from magdi.config import cli_check_run, cli_params
from magdi.pipeline.mags import stage_build_mags

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--task", required=True)
    a = ap.parse_args()
    p = cli_params(a.params)
    cli_check_run(p, a.task)
    print(json.dumps(stage_build_mags(p, a.task), indent=1))
