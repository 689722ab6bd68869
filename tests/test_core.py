"""The packed (prefix-sharing) LM pass of ``magdi.core``: layout, mask, and same losses/gradients as the
fused core of ``magdi.train`` on a tiny Llama."""

from __future__ import annotations

import shutil

import pytest
import torch

from magdi.config import LossWeights, TrainCfg
from magdi.core import block_mask, encode_packed, ntp_from_hidden, segment_attention, segment_runs
from magdi.losses import ntp_loss
from magdi.mag import MAG, Node
from magdi.train import MagdiStudent, TrainItem, build_items, encode_batch, encode_step, method_spec


class _CharTok:
    """One id per character (a=1, b=2, …), eos 9, pad 0: layouts can be checked by hand."""

    eos_token_id, pad_token_id = 9, 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) - 96 for c in text]}


def test_encode_packed_layout_by_hand() -> None:
    items = [TrainItem("ab", ["c", "de", "c"], [1, 0, 1]), TrainItem("fgh", ["ij"], [1]), TrainItem("k", ["l"], [0])]
    enc = encode_packed(items, _CharTok(), max_prompt=8, max_target=8)
    # packs: "ab|c·|de·" (7 tokens, · = eos; the repeated "c" is one chain), "fgh|ij·" (6), "k|l·" (3).
    # Rows are 7 wide (the longest pack); first-fit decreasing: [pack 0], [pack 1], [pack 2] — pack 2
    # does not fit next to pack 1 (6 + 3 > 7), so it gets the third row.
    assert enc.input_ids.tolist() == [[1, 2, 3, 9, 4, 5, 9], [6, 7, 8, 9, 10, 9, 0], [11, 12, 9, 0, 0, 0, 0]]
    assert enc.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4], [0, 1, 2, 3, 4, 5, 0], [0, 1, 2, 0, 0, 0, 0]]
    assert enc.segments.tolist() == [[0, 0, 1, 1, 2, 2, 2], [3, 3, 3, 4, 4, 4, -1], [5, 6, 6, -1, -1, -1, -1]]
    assert enc.owners.tolist() == [[0, 0, 0, 0, 0, 0, 0], [3, 3, 3, 3, 3, 3, -1], [5, 5, 5, -1, -1, -1, -1]]
    assert enc.node_rows == [[0, 1, 0], [2], [3]]
    # row view: column 0 = last prompt position, then the chain's own positions (flat index row * 7 + t)
    assert enc.gather[:, :4].tolist() == [[1, 2, 3, 1], [1, 4, 5, 6], [9, 10, 11, 12], [14, 15, 16, 14]]
    assert enc.labels.tolist() == [[-100, 3, 9, -100], [-100, 4, 5, 9], [-100, 9, 10, 9], [-100, 12, 9, -100]]
    assert enc.chain_mask.tolist() == [[0, 1, 1, 0], [0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 0]]
    # the fused core would send 2+2, 2+3, 3+3 and 1+2 tokens; the packed one sends each prompt once
    assert (enc.n_tokens, enc.lm_tokens) == (18, 16)


def test_encode_packed_shares_rows_between_short_packs() -> None:
    items = [TrainItem("abcd", ["ef"], [1]), TrainItem("g", ["h"], [1]), TrainItem("i", ["j"], [0])]
    enc = encode_packed(items, _CharTok(), max_prompt=8, max_target=8)
    # "abcd|ef·" (7) alone; "g|h·" and "i|j·" (3 each) share the second row, positions restarting at 0
    assert enc.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 9], [7, 8, 9, 9, 10, 9, 0]]
    assert enc.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2, 0]]
    assert enc.segments[1].tolist() == [2, 3, 3, 4, 5, 5, -1]
    assert enc.owners[1].tolist() == [2, 2, 2, 4, 4, 4, -1]
    m = block_mask(enc.segments, enc.owners, "sdpa", torch.float32)[1, 0].int().tolist()
    assert m[4] == [0, 0, 0, 1, 1, 0, 0]  # "j" sees its prompt "i" and itself, nothing of the other MAG
    assert enc.gather[2, :3].tolist() == [10, 11, 12]


def test_block_mask_by_hand() -> None:
    seg = torch.tensor([[0, 0, 1, 1, 2, -1]])
    own = torch.tensor([[0, 0, 0, 0, 0, -1]])
    m = block_mask(seg, own, "sdpa", torch.float32)[0, 0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # chain 2 sees the prompt, not chain 1
        [0, 0, 0, 0, 0, 1],  # padding sees only itself
    ]
    eager = block_mask(seg, own, "eager", torch.float32)[0, 0]
    assert torch.equal(eager == 0, torch.tensor(m, dtype=torch.bool))
    with pytest.raises(ValueError, match="sdpa/eager"):
        block_mask(seg, own, "flash_attention_2", torch.float32)


def test_flex_block_mask_equals_block_mask() -> None:
    """``train.attention: flex`` (1.25x per training step at Mistral-7B shape on an H100, reports/benchmark_gpu.md)
    must mask exactly as the dense mask does, position by position, on packs that share rows and on padding."""
    from torch.nn.attention.flex_attention import BlockMask, create_mask

    items = [TrainItem("abcd", ["ef", "xyz"], [1, 0]), TrainItem("g", ["h"], [1]), TrainItem("i", ["j", "k"], [0, 1])]
    enc = encode_packed(items, _CharTok(), max_prompt=8, max_target=8)
    for seg, own in [(enc.segments, enc.owners),
                     (torch.tensor([[0, 0, 1, 1, 2, -1]]), torch.tensor([[0, 0, 0, 0, 0, -1]]))]:
        bm = block_mask(seg, own, "flex_attention", torch.float32)
        assert isinstance(bm, BlockMask)
        n, length = seg.shape
        dense = create_mask(bm.mask_mod, n, 1, length, length, device="cpu")
        assert torch.equal(dense, block_mask(seg, own, "sdpa", torch.float32))


def test_flex_attention_needs_the_packed_core_and_cuda() -> None:
    from magdi.train import check_attention

    with pytest.raises(ValueError, match="flex needs train.core: packed"):
        TrainCfg(core="fused", attention="flex")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        check_attention("flex", torch.device("cpu"))
    check_attention("sdpa", torch.device("cpu"))
    check_attention("flex", torch.device("cuda", 0))


@pytest.mark.parametrize("chunk", [0, 3, 1000])
def test_ntp_from_hidden_equals_ntp_loss(chunk: int) -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(3, 6, 8, requires_grad=True)
    labels = torch.tensor([[-100, 4, 5, 6, -100, -100], [-100, -100, 1, 2, 3, 10], [-100] * 6])
    ref = ntp_loss(head(hidden), labels, torch.ones(3, dtype=torch.bool))
    got = ntp_from_hidden(head, hidden, labels, chunk)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    g_ref = torch.autograd.grad(ref, [hidden, head.weight])
    g_got = torch.autograd.grad(got, [hidden, head.weight])
    for a, b in zip(g_ref, g_got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _mags() -> list[MAG]:
    def nodes(k: int):
        return [Node("a", 0, f"{k} plus 3 is {k + 3}", str(k + 3), 0.9, True),
                Node("b", 0, f"{k} plus 3 is {k + 4}", str(k + 4), 0.8, False),
                Node("c", 0, f"{k} plus 3 is {k + 3}", str(k + 3), 0.7, True),  # same chain as a
                Node("a", 1, f"I agree, {k + 3}", str(k + 3), 0.9, True),
                Node("b", 1, f"I was wrong, it is {k + 3}", str(k + 3), 0.9, True),
                Node("c", 1, "Now I think 6", "6", 0.6, False)]
    return [MAG(f"m{k}", "gsm8k", f"What is {k} plus 3?", str(k + 3), nodes(k)) for k in (2, 5, 11)]


def _losses_and_grads(make_lm, tok, items, device: str = "cpu", head_dim: int | None = None, **cfg_kw):
    """One training step's losses, trainable-parameter gradients (copied to the CPU) and encoded batch."""
    cfg = TrainCfg(mags_per_step=5, max_prompt_tokens=48, max_target_tokens=16, hidden_dim=16,
                   weights=LossWeights(ntp=1.0, contrastive=0.5, graph=1.0), ntp_chunk=7, **cfg_kw)
    torch.manual_seed(0)
    lm = make_lm(head_dim=head_dim)
    with torch.no_grad():  # LoRA B starts at 0, which would leave every lora_A gradient 0
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    student = MagdiStudent(lm, method_spec("magdi"), cfg).to(device)
    student.train()  # the tiny LoRA has dropout 0: train mode is deterministic
    enc = encode_batch(items, tok, cfg).to(device)
    out = student(enc, items, step_seed=5)
    out["loss"].backward()
    grads = {k: p.grad.to("cpu", copy=True) for k, p in student.named_parameters() if p.requires_grad}
    return {k: v.item() for k, v in out.items()}, grads, enc


@pytest.mark.parametrize("encoder", ["gcn", "token_attention"])
@pytest.mark.parametrize("node_repr", ["live", "frozen"])
def test_packed_core_matches_fused_losses_and_gradients(make_lm, tiny_tokenizer, encoder, node_repr) -> None:
    # two short MAGs (bare prompts, no chat template) whose packs fit into one row together
    short = [TrainItem(f"{k}+1?", ["easy", f"it is {k}"], [1, 0], [(0, 1)], f"s{k}") for k in (1, 2)]
    items = build_items(_mags(), method_spec("magdi"), tiny_tokenizer) + short
    kw = {"encoder": encoder, "node_repr": node_repr}
    l_f, g_f, enc_f = _losses_and_grads(make_lm, tiny_tokenizer, items, core="fused", attention="sdpa", **kw)
    l_p, g_p, enc_p = _losses_and_grads(make_lm, tiny_tokenizer, items, core="packed", **kw)
    assert enc_p.n_tokens == enc_f.n_tokens  # same useful tokens...
    assert enc_p.lm_tokens < enc_f.n_tokens  # ...fewer through the LM
    assert enc_p.input_ids.shape[0] < len(items)  # the short MAGs' packs share a row
    for k in l_f:
        assert l_p[k] == pytest.approx(l_f[k], rel=1e-5), k
    assert g_f.keys() == g_p.keys()
    lora = [k for k in g_f if "lora_" in k]
    assert lora and all(g_f[k].abs().sum() > 0 for k in lora)
    for k in g_f:
        torch.testing.assert_close(g_p[k], g_f[k], rtol=1e-5, atol=1e-5 * g_f[k].abs().max().item() + 1e-9)


def test_packed_core_eager_and_flex_attention_match_sdpa(make_lm, tiny_tokenizer) -> None:
    """Forward only: FlexAttention runs forward on CPU, its backward needs CUDA (the CUDA test below)."""
    items = build_items(_mags()[:2], method_spec("magdi"), tiny_tokenizer)
    cfg = TrainCfg(max_prompt_tokens=48, max_target_tokens=16, hidden_dim=16, core="packed", attention="sdpa")
    enc = encode_batch(items, tiny_tokenizer, cfg)
    outs = []
    for impl in ("sdpa", "eager", "flex_attention"):
        torch.manual_seed(0)
        lm = make_lm()
        lm.get_base_model().set_attn_implementation(impl)
        student = MagdiStudent(lm, method_spec("magdi"), cfg).eval()
        with torch.no_grad():
            outs.append(student(enc, items, 1)["loss"].item())
    assert outs[1] == pytest.approx(outs[0], rel=1e-5)
    assert outs[2] == pytest.approx(outs[0], rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flex_attention_training_step_matches_sdpa_on_cuda(make_lm, tiny_tokenizer) -> None:
    """``train.attention: flex``: same losses and LoRA/head gradients as the dense-mask SDPA step (fp32)."""
    items = build_items(_mags(), method_spec("magdi"), tiny_tokenizer)
    # FlexAttention's CUDA kernel needs heads at least 16 wide
    runs = [_losses_and_grads(make_lm, tiny_tokenizer, items, "cuda", 16, attention=attention)[:2]
            for attention in ("sdpa", "flex")]
    (l_s, g_s), (l_f, g_f) = runs
    for k in l_s:
        assert l_f[k] == pytest.approx(l_s[k], rel=1e-4), k
    for k in g_s:
        torch.testing.assert_close(g_f[k], g_s[k], rtol=1e-3, atol=1e-4 * g_s[k].abs().max().item() + 1e-8)


def test_encode_batch_follows_train_core(tiny_tokenizer) -> None:
    items = build_items(_mags()[:1], method_spec("magdi"), tiny_tokenizer)
    fused = encode_batch(items, tiny_tokenizer, TrainCfg(core="fused", attention="sdpa"))
    assert type(fused) is type(encode_step(items, tiny_tokenizer, 160, 160))
    assert type(encode_batch(items, tiny_tokenizer, TrainCfg())).__name__ == "PackedEncoded"


def _train(lm, tok, tmp_path, **cfg_kw):
    from accelerate.state import AcceleratorState

    from magdi.train import train

    # accelerate keeps one process-wide state: a run with another mixed_precision would refuse to start
    AcceleratorState._reset_state(reset_partial_state=True)
    spec = method_spec("magdi")
    items = build_items(_mags(), spec, tok)
    cfg = TrainCfg(mags_per_step=2, max_prompt_tokens=48, max_target_tokens=16, hidden_dim=16, lr=1e-2,
                   checkpoint_every=10, **cfg_kw)
    return train(lm, tok, items, spec, cfg, tmp_path / str(sorted(cfg_kw.items())))


def test_train_loop_packed_matches_fused(make_lm, tiny_tokenizer, tmp_path) -> None:
    fused = _train(make_lm(), tiny_tokenizer, tmp_path, core="fused", attention="sdpa")
    packed = _train(make_lm(), tiny_tokenizer, tmp_path, core="packed")
    assert fused.tokens == packed.tokens and len(fused.history) == len(packed.history) == 2
    for hf, hp in zip(fused.history, packed.history, strict=True):
        for k in ("loss", "ntp", "contrastive", "graph"):
            assert hp[k] == pytest.approx(hf[k], rel=1e-4), k


def test_train_bf16_base_weights_keep_fp32_lora(tiny_tokenizer, tmp_path) -> None:
    """student.dtype=bfloat16 + train.bf16: bf16 frozen weights, fp32 LoRA master weights, same first loss."""
    from conftest import build_lm
    from magdi.student import attach_lora

    ref = _train(build_lm(tiny_tokenizer), tiny_tokenizer, tmp_path)
    base = build_lm(tiny_tokenizer, lora=False).to(torch.bfloat16)
    lm = attach_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    before = {k: v.detach().clone() for k, v in lm.named_parameters() if v.requires_grad}
    assert before and all(v.dtype == torch.float32 for v in before.values())
    res = _train(lm, tiny_tokenizer, tmp_path, bf16=True)
    after = {k: v for k, v in lm.named_parameters() if v.requires_grad}
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert res.history[0]["loss"] == pytest.approx(ref.history[0]["loss"], rel=2e-2)


def test_generation_dtype_is_used_by_generating_stages(monkeypatch, tmp_path) -> None:
    """Teachers on local weights and evaluation load the student in ``student.generation_dtype``."""
    import magdi.student
    from magdi import pipeline
    from magdi.config import StudentCfg, load_params

    assert StudentCfg(model="m", dtype="float32", generation_dtype=None).gen_dtype == "float32"  # null = the training dtype
    assert StudentCfg(model="m", dtype="float32", generation_dtype="bfloat16").gen_dtype == "bfloat16"
    p = load_params("params.yaml", check_mirror=False)
    p = p.model_copy(update={"evaluate": p.evaluate.model_copy(update={"backend": "transformers"}),
                             "student": p.student.model_copy(update={"dtype": "float32",
                                                                     "generation_dtype": "bfloat16"})})
    seen = []

    def fake_load(path, dtype="float32", trust_remote_code=False):
        seen.append(dtype)
        raise RuntimeError("stop")

    monkeypatch.setattr(magdi.student, "load_student", fake_load)
    with pytest.raises(RuntimeError, match="stop"):
        pipeline._student_generator(p, None)
    # a local teacher on the student (no dtype of its own) loads lazily, on its first cache miss
    from magdi.config import AgentCfg

    agents_cfg = [AgentCfg(name="smol", backend="local", model="student"), AgentCfg(name="ref", backend="reference")]
    p = p.model_copy(update={"teachers": p.teachers.model_copy(update={"agents": agents_cfg}),
                             "paths": p.paths.model_copy(update={"cache_dir": str(tmp_path)})})
    agents = pipeline.make_agents(p)
    assert seen == ["bfloat16"]
    with pytest.raises(RuntimeError, match="stop"):
        agents[0].backend._ensure_loaded()
    assert seen == ["bfloat16", "bfloat16"]


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_layers_match_eager_losses_and_gradients(make_lm, tiny_tokenizer) -> None:
    """``train.compile``: each decoder layer through torch.compile gives the eager step's losses and gradients."""
    items = build_items(_mags(), method_spec("magdi"), tiny_tokenizer)
    l_e, g_e, _ = _losses_and_grads(make_lm, tiny_tokenizer, items, core="packed")
    l_c, g_c, _ = _losses_and_grads(make_lm, tiny_tokenizer, items, core="packed", compile=True)
    for k in l_e:
        assert l_c[k] == pytest.approx(l_e[k], rel=1e-5), k
    for k in g_e:
        torch.testing.assert_close(g_c[k], g_e[k], rtol=1e-4, atol=1e-5 * g_e[k].abs().max().item() + 1e-9)


def test_segment_runs_by_hand() -> None:
    # row 0: prompt (seg 0) of 3, chain 1 of 2, chain 2 of 1, padding 2; row 1: prompt 3 of 2, its chain 4 of 2
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [3, 3, 4, 4, -1, -1, -1, -1]])
    own = torch.tensor([[0, 0, 0, 0, 0, 0, -1, -1], [3, 3, 3, 3, -1, -1, -1, -1]])
    assert segment_runs(seg, own) == [[(0, 3, 0, 0), (3, 5, 0, 3), (5, 6, 0, 3), (6, 8, -1, -1)],
                                      [(0, 2, 0, 0), (2, 4, 0, 2), (4, 8, -1, -1)]]


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_segment_attention_equals_masked_sdpa(heads) -> None:
    """Same attention as the dense block mask on every real position (GQA too); zeros on padding."""
    torch.manual_seed(0)
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, -1], [5, 5, 6, 6, 6, -1, -1, -1, -1, -1, -1, -1]])
    own = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 3, 3, 3, -1], [5, 5, 5, 5, 5, -1, -1, -1, -1, -1, -1, -1]])
    h, h_kv = heads
    q = torch.randn(2, h, 12, 8, dtype=torch.float64)
    k, v = torch.randn(2, h_kv, 12, 8, dtype=torch.float64), torch.randn(2, h_kv, 12, 8, dtype=torch.float64)
    mask = block_mask(seg, own, "sdpa", torch.float64)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3,
                                                          enable_gqa=h != h_kv).transpose(1, 2)
    got, _ = segment_attention(None, q, k, v, None, scaling=0.3, packed_runs=segment_runs(seg, own))
    real = seg >= 0
    torch.testing.assert_close(got[real], ref[real])
    assert not got[~real].any()
    runs = segment_runs(seg, own)  # longest look-back: row 0's chain 2 (3 tokens) over its prompt (3 tokens)
    assert segment_attention(None, q, k, v, None, scaling=0.3, packed_runs=runs, sliding_window=6)[0].shape == got.shape
    with pytest.raises(ValueError, match="sliding window"):
        segment_attention(None, q, k, v, None, scaling=0.3, packed_runs=runs, sliding_window=5)
    with pytest.raises(ValueError, match="softcap"):
        segment_attention(None, q, k, v, None, packed_runs=runs, softcap=30.0)
    # without the runs (fused rows, generation): transformers' SDPA with the mask it is given
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = h // h_kv, True
    plain, _ = segment_attention(module, q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(plain[real], ref[real])


def test_segments_training_step_matches_dense_sdpa(make_lm, tiny_tokenizer) -> None:
    """``train.attention: segments`` (the default): the losses and gradients of the dense-mask step (fp32)."""
    items = build_items(_mags(), method_spec("magdi"), tiny_tokenizer)
    (l_s, g_s, _), (l_g, g_g, _) = [_losses_and_grads(make_lm, tiny_tokenizer, items, attention=a)
                                    for a in ("sdpa", "segments")]
    for k in l_s:
        assert l_g[k] == pytest.approx(l_s[k], rel=1e-5), k
    for k in g_s:
        torch.testing.assert_close(g_g[k], g_s[k], rtol=1e-5, atol=1e-5 * g_s[k].abs().max().item() + 1e-9)
    with pytest.raises(ValueError, match="train.attention: segments needs train.core: packed"):
        TrainCfg(core="fused", attention="segments")
