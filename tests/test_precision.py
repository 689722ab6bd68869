"""``auto`` precision: bf16 only where the device computes it natively (magdi.precision), resolved against faked
machines; the training loop's guard; explicit values; ``python -m magdi precision``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from magdi import precision as pr
from magdi.precision import Capabilities, cpu_class, resolve

AMX = Capabilities("x86_64", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}), "Xeon SPR")
AVX512_BF16 = Capabilities("x86_64", frozenset({"avx2", "avx512f", "avx512_bf16"}), "EPYC Zen 4")
AVX512 = Capabilities("x86_64", frozenset({"avx2", "avx512f"}), "Xeon Skylake")
AVX2 = Capabilities("x86_64", frozenset({"avx2", "fma"}), "EPYC Zen 3")
ARM_BF16 = Capabilities("aarch64", frozenset({"fp", "asimd", "sve", "bf16"}), "Neoverse V1")
ARM = Capabilities("aarch64", frozenset({"fp", "asimd"}), "Neoverse N1")
CUDA_BF16 = Capabilities("x86_64", AVX2.cpu_flags, "host", cuda=True, cuda_bf16=True, cuda_device="NVIDIA H100")
CUDA_OLD = Capabilities("x86_64", AVX2.cpu_flags, "host", cuda=True, cuda_bf16=False, cuda_device="Tesla V100")


@pytest.mark.parametrize(("caps", "device", "dtype", "cls"), [
    (AMX, "cpu", "bfloat16", "x86-64 AMX"),
    (AVX512_BF16, "cpu", "bfloat16", "x86-64 AVX512-BF16"),
    (AVX512, "cpu", "float32", "x86-64 AVX-512"),
    (AVX2, "cpu", "float32", "x86-64 AVX2"),
    (ARM_BF16, "cpu", "bfloat16", "aarch64 BF16"),
    (ARM, "cpu", "float32", "aarch64"),
    (CUDA_BF16, "cuda", "bfloat16", "x86-64 AVX2"),
    (CUDA_OLD, "cuda", "float32", "x86-64 AVX2"),
    (AVX2, "cuda", "float32", "x86-64 AVX2"),   # no CUDA at all: nothing native there
])
def test_auto_resolves_to_bf16_only_where_native(caps, device, dtype, cls) -> None:
    r = resolve("auto", caps, device)
    assert (r.dtype, cpu_class(caps), r.setting) == (dtype, cls, "auto")
    assert r.reason.startswith(f"{dtype}: ")


def test_reasons_name_what_decided() -> None:
    assert resolve("auto", AVX2).reason == "float32: CPU has AVX2, no native bf16"
    assert resolve("auto", AMX).reason == "bfloat16: CPU has AMX"
    assert "H100 supports bf16" in resolve("auto", CUDA_BF16, "cuda").reason
    assert "without the BF16 extension" in resolve("auto", ARM).reason


def test_onednn_cap_below_bf16_means_fp32() -> None:
    """ONEDNN_MAX_CPU_ISA=AVX2 keeps torch's oneDNN off the bf16 instructions: auto is then fp32."""
    capped = Capabilities("x86_64", AMX.cpu_flags, onednn_max_isa="AVX2")
    assert resolve("auto", capped).dtype == "float32"
    assert "ONEDNN_MAX_CPU_ISA" in resolve("auto", capped).reason
    assert resolve("auto", Capabilities("x86_64", AMX.cpu_flags, onednn_max_isa="AVX512_CORE_AMX")).dtype == "bfloat16"


def test_explicit_values_are_obeyed_and_bf16_without_native_warns_once() -> None:
    pr._warn_once.cache_clear()
    assert resolve("float32", AMX).dtype == "float32"
    assert resolve(False, AMX).dtype == "float32" and resolve(None, AMX).dtype == "float32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bf16 where native: no warning
        assert resolve(True, AMX).dtype == "bfloat16"
    with pytest.warns(RuntimeWarning, match="train.bf16: bfloat16 was set explicitly, but CPU has AVX2"):
        assert resolve(True, AVX2, what="train.bf16").dtype == "bfloat16"  # runs as asked
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert resolve("bfloat16", AVX2, what="train.bf16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="auto, float32"):
        resolve("bf16", AVX2)


def test_detect_reads_cpuinfo_flags_and_the_onednn_cap(tmp_path: Path, monkeypatch) -> None:
    cpu = tmp_path / "cpuinfo"
    cpu.write_text("processor\t: 0\nmodel name\t: Fake EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                   "processor\t: 1\nflags\t\t: fpu\n")
    monkeypatch.setattr(pr.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    c = pr.detect(cpu, with_cuda=False)
    assert (c.cpu_model, c.onednn_max_isa, "avx512_bf16" in c.cpu_flags) == ("Fake EPYC", None, True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert resolve("auto", pr.detect(cpu, with_cuda=False)).dtype == "float32"
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16\nCPU part\t: 0xd40\n")
    monkeypatch.setattr(pr.platform, "machine", lambda: "aarch64")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert resolve("auto", pr.detect(arm, with_cuda=False)).dtype == "bfloat16"


def test_training_loop_never_autocasts_bf16_by_default_without_native_bf16(tiny_tokenizer, make_lm, tmp_path,
                                                                            monkeypatch) -> None:
    """The guard: with ``train.bf16: auto`` (the default) on an AVX2-only CPU the loop builds its Accelerator without
    mixed precision and trains in fp32; on a faked AMX CPU the same default turns bf16 autocast on."""
    import accelerate

    from magdi import train as tr
    from magdi.config import TrainCfg
    from test_train import _train_mags  # the MAGs of the training-loop tests

    seen: list[str] = []
    real = accelerate.Accelerator

    def spy(*a, **kw):
        seen.append(kw.get("mixed_precision"))
        return real(*a, **kw)

    monkeypatch.setattr(accelerate, "Accelerator", spy)
    cfg = TrainCfg(max_prompt_tokens=32, max_target_tokens=16, mags_per_step=2, checkpoint_every=100)
    assert cfg.bf16 == "auto"
    spec = tr.method_spec("magdi")
    items = tr.build_items(_train_mags(), spec, tiny_tokenizer, cfg.graph)
    res = tr.train(make_lm(), tiny_tokenizer, items, spec, cfg, tmp_path / "avx2", stop_after=1)
    assert (seen, res.precision) == (["no"], "float32")
    assert res.precision_reason == "float32: CPU has AVX2, no native bf16"
    monkeypatch.setattr(pr, "capabilities", lambda: AMX)
    res = tr.train(make_lm(), tiny_tokenizer, items, spec, cfg, tmp_path / "amx", stop_after=1)
    assert (seen[-1], res.precision) == ("bf16", "bfloat16")


def test_generation_dtype_auto_follows_the_machine(monkeypatch) -> None:
    from magdi.config import AgentCfg, StudentCfg, load_params

    assert StudentCfg(model="m").generation_dtype == "auto" and StudentCfg(model="m").gen_dtype == "float32"  # conftest: AVX2
    p = load_params("params.yaml", check_mirror=False)
    assert {p.teacher_precision(a).dtype for a in p.teachers.agents} == {"float32"}
    monkeypatch.setattr(pr, "capabilities", lambda: AVX512_BF16)
    assert StudentCfg(model="m").gen_dtype == "bfloat16"
    assert p.teacher_precision(AgentCfg(name="x", backend="local", dtype="float32")).dtype == "float32"
    assert {p.teacher_precision(a).dtype for a in p.teachers.agents} == {"bfloat16"}


def test_cli_precision_json_says_float32_on_avx2_and_bf16_on_amx(monkeypatch, capsys) -> None:
    from magdi.__main__ import main

    monkeypatch.setattr(pr, "capabilities", lambda: AVX2)
    assert main(["precision", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["train"], out["generate"], out["teachers"]) == ("float32", "float32", "float32")
    assert out["cpu_class"] == "x86-64 AVX2"
    monkeypatch.setattr(pr, "capabilities", lambda: AMX)
    assert main(["precision"]) == 0
    text = capsys.readouterr().out
    assert "train     bfloat16: CPU has AMX" in text and "CPU class: x86-64 AMX" in text


def test_local_teacher_records_precision_and_cpu_class_beside_each_new_reply(tiny_tokenizer, make_lm,
                                                                               tmp_path) -> None:
    """New replies carry the dtype and CPU class that produced them; the key does not, so the cache replays
    on any machine."""
    from magdi.cache import CallCache
    from magdi.discussion import LocalBackend, Request

    cache = CallCache(tmp_path / "c.jsonl")
    be = LocalBackend(make_lm(lora=False).eval(), tiny_tokenizer, "local:tiny", cache, batch_size=2)
    msgs = [{"role": "user", "content": "What is 2 plus 3?"}]
    got = be.generate_many([Request(msgs, 0.0, 1.0, 8, 0)])
    line = json.loads((tmp_path / "c.jsonl").read_text().splitlines()[0])
    assert (line["v"]["precision"], line["v"]["cpu_class"]) == ("float32", "x86-64 AVX2")
    assert got[0] == line["v"]  # what the discussion reads is what a replay reads
    replay = LocalBackend(None, None, "local:tiny", CallCache(tmp_path / "c.jsonl"), loader=lambda: 1 / 0)
    assert replay.generate_many([Request(msgs, 0.0, 1.0, 8, 0)])[0]["text"] == got[0]["text"]  # no load


def test_converted_student_does_not_depend_on_environment_variables(tiny_tokenizer, make_lm, tmp_path,
                                                                     monkeypatch) -> None:
    """Two conversions of the same source, with and without HF_HUB_OFFLINE, give byte-identical folders: the
    load-time keys (``local_files_only``, ``transformers_version``) are not written; every file's sha256 is
    recorded for the stage's metrics."""
    from magdi.student import LOAD_TIME_KEYS, convert_student, load_student

    src = tmp_path / "src"
    make_lm(lora=False).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a = convert_student(str(src), tmp_path / "a")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    b = convert_student(str(src), tmp_path / "b")
    assert a["files_sha256"] == b["files_sha256"]
    assert {"config.json", "tokenizer_config.json", "model.safetensors"} <= set(a["files_sha256"])
    for name, keys in LOAD_TIME_KEYS.items():
        if (tmp_path / "a" / name).is_file():
            assert not set(json.loads((tmp_path / "a" / name).read_text())) & set(keys)
    model, _ = load_student(tmp_path / "a")  # reads back without the version stamp
    assert model.config.num_hidden_layers == make_lm(lora=False).config.num_hidden_layers


def test_report_says_when_runs_disagree_on_cpu_class_or_precision(tmp_path: Path) -> None:
    from magdi.report.readme import numerics_lines

    def put(kind: str, run: str, cls: str, what: str, dtype: str, reason: str) -> None:
        f = tmp_path / kind / run / "gsm8k.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"numerics": {"cpu_class": cls, "precision": {what: dtype, "reason": reason}}}))

    put("train", "magdi", "x86-64 AMX", "train", "bfloat16", "bfloat16: CPU has AMX")
    put("train", "magdi@smol", "x86-64 AMX", "train", "float32", "float32: set explicitly (CPU has AMX)")
    put("eval", "magdi", "x86-64 AMX", "generate", "bfloat16", "bfloat16: CPU has AMX")
    (line,) = numerics_lines(tmp_path)
    assert line.startswith("- numerics: every run on CPU class `x86-64 AMX`") and "explicit float32" in line
    put("eval", "zero_shot", "x86-64 AVX2", "generate", "float32", "float32: CPU has AVX2, no native bf16")
    (line,) = numerics_lines(tmp_path)
    assert "numerics differ between runs" in line and "`x86-64 AVX2`: 1 runs (e.g. eval/zero_shot/gsm8k)" in line
    assert "`bfloat16` (1 runs), `float32` (1 runs)" in line
    assert numerics_lines(tmp_path / "none") == []


def test_report_derives_the_cpu_class_from_a_fingerprint_without_one() -> None:
    from magdi.report.readme import recorded_cpu_class

    fp = {"machine": "x86_64", "cpu_matrix_flags": ["avx512_bf16"], "cpu_capability": "AVX512",
          "onednn_max_cpu_isa": None}
    assert recorded_cpu_class(fp) == "x86-64 AVX512-BF16"
    assert recorded_cpu_class({**fp, "cpu_matrix_flags": [], "cpu_capability": "AVX2"}) == "x86-64 AVX2"
    assert recorded_cpu_class({**fp, "cpu_matrix_flags": ["amx_bf16", "avx512_bf16"]}) == "x86-64 AMX"
    assert recorded_cpu_class({**fp, "cpu_class": "aarch64 BF16"}) == "aarch64 BF16"
