"""DVC stage `prepare_student`: materialise the student once as safetensors (dequantising a packaged GGUF)."""

import argparse

from magdi.config import cli_params
from magdi.pipeline.prepare import stage_prepare_student

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    print(stage_prepare_student(cli_params(ap.parse_args().params)))
