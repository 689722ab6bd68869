"""`make quick`: the pipeline on a small cut (configs/quick.yaml merged onto params.yaml) in a scratch copy of the
repository (.quick/), so the committed results (`reports/`, `metrics/`, `dvc.lock`) stay untouched. The copy holds
the tracked files and `teacher_cache/`; the discussions replay from the cache. Prints where its report is.

    python tools/quick.py [--dir .quick] [--overrides configs/quick.yaml]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=".quick")
    ap.add_argument("--overrides", default="configs/quick.yaml")
    a = ap.parse_args()
    work = (ROOT / a.dir).resolve()
    if work == ROOT or ROOT not in work.parents:
        sys.exit(f"--dir must be a folder inside the repository, got {work}")
    shutil.rmtree(work, ignore_errors=True)
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file() and not f.startswith(("reports/", "metrics/")) and f != "dvc.lock":
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / f)
    from magdi.config import _deep_merge  # the merge every override of params gets

    params = _deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                    yaml.safe_load((ROOT / a.overrides).read_text()))
    mirror = Path(params["paths"]["mirror_dir"])  # read-only benchmark mirror: where the repository's params point
    params["paths"]["mirror_dir"] = str(mirror if mirror.is_absolute() else (ROOT / mirror).resolve())
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (work / "reports").mkdir(exist_ok=True)
    # the copy is not a git repository: a fresh DVC project without SCM (the tracked .dvc/ belongs to the git one);
    # metrics and reports land in the copy only
    shutil.rmtree(work / ".dvc", ignore_errors=True)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=work, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=work, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, check=True)
    print(f"quick look done in {(time.time() - t0) / 60:.1f} min: {work / 'reports' / 'README.md'} "
          f"(Table 1: {work / 'reports' / 'table1_main.md'}); the committed results are untouched")


if __name__ == "__main__":
    main()
