"""DVC stage `evaluate`: the trained student answers test questions alone; accuracy, CI, tokens, predictions."""

import argparse
import json

from magdi.config import cli_check_run, cli_for_student, cli_params
from magdi.pipeline.evaluation import stage_evaluate, stage_evaluate_mt, stage_zero_shot

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--task", help="training task of the run (omit with --zero-shot / --multitask)")
    ap.add_argument("--method")
    ap.add_argument("--zero-shot", action="store_true", help="base model on all tasks and OOD tasks")
    ap.add_argument("--multitask", action="store_true", help="magdi_mt on all tasks and OOD tasks")
    ap.add_argument("--student", help="one of experiments.scaling_students instead of the main student "
                                      "(with --zero-shot: on experiments.scaling_tasks)")
    a = ap.parse_args()
    p = cli_params(a.params)
    cli_for_student(p, a.student)
    if a.zero_shot:
        res = stage_zero_shot(p, a.student)
    elif a.multitask:
        if a.student:
            ap.error("--multitask runs on the main student only")
        res = stage_evaluate_mt(p)
    else:
        if not (a.task and a.method):
            ap.error("--task and --method are required")
        cli_check_run(p, a.task, a.method, evaluate=True)
        res = stage_evaluate(p, a.task, a.method, student=a.student)
    print(json.dumps(res, indent=1))
