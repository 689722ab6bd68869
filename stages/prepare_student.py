"""DVC stage `prepare_student`: materialise the student once as safetensors (dequantising a packaged GGUF)."""

# ruff: noqa: E402 -- delegate() comes first: in a warm server (magdi.warm) the imports below are pre-loaded
from magdi.warm import delegate

delegate(__file__)

import argparse

from magdi.config import cli_params
from magdi.pipeline import stage_prepare_student

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    print(stage_prepare_student(cli_params(ap.parse_args().params)))
