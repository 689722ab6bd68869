"""DVC stage `build_mags`: teachers discuss each training question (ReConcile) -> one MAG per question."""

# ruff: noqa: E402 -- delegate() comes first: in a warm server (magdi.warm) the imports below are pre-loaded
from magdi.warm import delegate

delegate(__file__)

import argparse
import json

from magdi.config import cli_check_run, cli_params
from magdi.pipeline import stage_build_mags

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--task", required=True)
    a = ap.parse_args()
    p = cli_params(a.params)
    cli_check_run(p, a.task)
    print(json.dumps(stage_build_mags(p, a.task), indent=1))
