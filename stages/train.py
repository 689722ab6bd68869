"""DVC stage `train`: fine-tune the student (LoRA) with one method on one task's MAGs (or all tasks: multitask)."""

import argparse
import json

from magdi.config import MT_METHOD, MT_TASK, cli_check_run, cli_for_student, cli_params
from magdi.pipeline.training import stage_train

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--task", required=True, help=f"a task, or '{MT_TASK}' (with --method {MT_METHOD})")
    ap.add_argument("--method", required=True, help="a method, sit_<agent>, or an ablation name from params")
    ap.add_argument("--student", help="one of experiments.scaling_students instead of the main student")
    a = ap.parse_args()
    p = cli_params(a.params)
    cli_check_run(p, a.task, a.method)
    cli_for_student(p, a.student)
    print(json.dumps(stage_train(p, a.task, a.method, a.student), indent=1))
