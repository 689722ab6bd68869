"""Drop the dvc.lock entries of stages that dvc.yaml no longer defines.

DVC rewrites a stage's lock entry when it runs the stage but does not remove the entry of a stage that left the
pipeline (a task or method taken out of ``experiments``, a stage renamed): the lock keeps describing runs that
are not part of the pipeline any more, and a reader cannot tell them from the committed run. Entries of stages
that dvc.yaml still defines are left byte-for-byte as they are (ruamel round trip through DVC's own
``modify_yaml``), so ``dvc status`` answers the same before and after.

    python tools/prune_lock.py            # in the repository root, after `make repro`
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path


def stale_entries(lock_stages: Mapping[str, object], defined: Iterable[str]) -> list[str]:
    """Names of lock entries with no stage of that name in the pipeline, in lock order."""
    keep = set(defined)
    return [name for name in lock_stages if name not in keep]


def prune(root: Path) -> list[str]:
    """Remove the stale entries from ``root/dvc.lock``; return their names."""
    from dvc.repo import Repo
    from dvc.utils.serialize import modify_yaml

    with Repo(str(root)) as repo:
        defined = [stage.addressing for stage in repo.index.stages]
    with modify_yaml(root / "dvc.lock") as lock:
        stale = stale_entries(lock.get("stages", {}), defined)
        for name in stale:
            del lock["stages"][name]
    return stale


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path.cwd()
    stale = prune(root)
    print(f"dvc.lock: removed {len(stale)} entries of stages no longer in dvc.yaml" + (f": {', '.join(stale)}"
                                                                                        if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
