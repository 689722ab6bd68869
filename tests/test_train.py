"""The shared training core (``magdi.train``): which nodes each method trains on, step encoding with
deduplication, length-grouped planning, the one-pass MagdiStudent objective, gradient flow of the graph
loss into LoRA (live vs frozen node representations), and checkpoint/resume of ``train()``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from magdi.config import LossWeights, TrainCfg
from magdi.losses import margin_ranking_loss, ntp_loss, pair_indices, position_weighted_mean
from magdi.mag import MAG, Node, edges
from magdi.student import DSS_ANSWER_PREFIX, DSS_RATIONALE_PREFIX, student_prompt, student_target
from magdi.train import (
    MagdiStudent,
    MethodSpec,
    TrainItem,
    build_items,
    encode_step,
    grad_norm,
    items_per_step,
    method_spec,
    official_pairs,
    plan_steps,
    train,
)

ROOT = Path(__file__).resolve().parents[1]

QUESTION = "What is 2 plus 3?"


def _cfg(**kw) -> TrainCfg:
    base = {"mags_per_step": 2, "max_prompt_tokens": 32, "max_target_tokens": 16, "hidden_dim": 16,
            "checkpoint_every": 1, "lr": 1e-2, "epochs": 1,
            "bf16": False}  # explicit: subprocess workers (DDP) do not see conftest's fp32 machine
    return TrainCfg(**{**base, **kw})


def _mag(mag_id: str = "m1", question: str = QUESTION) -> MAG:
    """G1 MAG. Round 0: a+ b- c+ (a and c wrote the same chain); round 1: a+ b+ c-."""
    nodes = [
        Node("a", 0, "2 plus 3 is 5", "5", 0.9, True),
        Node("b", 0, "2 plus 3 is 6", "6", 0.8, False),
        Node("c", 0, "2 plus 3 is 5", "5", 0.7, True),
        Node("a", 1, "I agree, 5", "5", 0.9, True),
        Node("b", 1, "I was wrong, 5", "5", 0.9, True),
        Node("c", 1, "Now I think 6", "6", 0.6, False),
    ]
    return MAG(mag_id, "gsm8k", question, "5", nodes)


def _prompt(tok, mag: MAG, prefix: str = "") -> str:
    return student_prompt(tok, {"question": mag.question, "choices": None}, "number", prefix)


def _targets(mag: MAG, idx: list[int]) -> list[str]:
    return [student_target(mag.nodes[i].reasoning, mag.nodes[i].answer) for i in idx]


# ============================================================================== methods -> items
def test_method_spec_for_every_method() -> None:
    assert method_spec("sit_a") == MethodSpec("agent_round0_correct", agent="a")
    assert method_spec("sit_gpt4") == MethodSpec("agent_round0_correct", agent="gpt4")
    assert method_spec("dss_mt") == MethodSpec("dss")
    assert method_spec("magdi_r0") == MethodSpec("round0_correct")
    assert method_spec("magdi_cn") == MethodSpec("correct")
    assert method_spec("magdi_an") == MethodSpec("all", contrastive=True)
    assert method_spec("magdi") == MethodSpec("all", contrastive=True, graph=True)
    for m in ("zero_shot", "magdi_xx"):
        with pytest.raises(ValueError, match="no training recipe"):
            method_spec(m)


@pytest.mark.parametrize(
    ("method", "node_idx"),
    [("sit_a", [0]), ("sit_c", [2]), ("magdi_r0", [0, 2]), ("magdi_cn", [0, 2, 3, 4]),
     ("magdi_an", [0, 1, 2, 3, 4, 5]), ("magdi", [0, 1, 2, 3, 4, 5])],
)
def test_build_items_selects_nodes(tiny_tokenizer, method: str, node_idx: list[int]) -> None:
    m = _mag()
    (item,) = build_items([m], method_spec(method), tiny_tokenizer)
    assert item.prompt == _prompt(tiny_tokenizer, m)
    assert item.targets == _targets(m, node_idx)
    assert item.labels == [m.nodes[i].label for i in node_idx]
    assert item.mag_id == "m1"
    if method.startswith("magdi_a") or method == "magdi":
        assert item.edge_index == edges(m, "d") and len(item.edge_index) == 9
    else:
        assert item.edge_index == []


def test_build_items_graph_kind_and_empty_selection(tiny_tokenizer) -> None:
    m = _mag()
    (item,) = build_items([m], method_spec("magdi"), tiny_tokenizer, graph_kind="fc")
    assert len(item.edge_index) == 6 * 5
    (item,) = build_items([m], method_spec("magdi"), tiny_tokenizer, graph_kind="ud")
    assert len(item.edge_index) == 18
    # agent b is wrong in round 0: sit_b has nothing to learn from this MAG; an unknown agent neither
    assert build_items([m], method_spec("sit_b"), tiny_tokenizer) == []
    assert build_items([m], method_spec("sit_zed"), tiny_tokenizer) == []


def test_build_items_dss_two_tasks(tiny_tokenizer) -> None:
    m = _mag()
    m.nodes.append(Node("b", 2, "garbled reply", None, 0.0, False, valid=False))
    answer, rationale = build_items([m], method_spec("dss_mt"), tiny_tokenizer)
    assert answer.prompt == _prompt(tiny_tokenizer, m, DSS_ANSWER_PREFIX)
    assert answer.targets == ["The answer is 5."] and answer.labels == [1]
    assert rationale.prompt == _prompt(tiny_tokenizer, m, DSS_RATIONALE_PREFIX)
    # every valid node's rationale once (a's and c's identical round-0 chains count once), no invalid node
    assert rationale.targets == ["2 plus 3 is 5", "2 plus 3 is 6", "I agree, 5", "I was wrong, 5", "Now I think 6"]
    assert rationale.labels == [1] * 5
    assert answer.edge_index == rationale.edge_index == []


def test_build_items_invalid_node_is_a_negative_with_unknown_answer(tiny_tokenizer) -> None:
    m = _mag()
    m.nodes.append(Node("b", 2, "garbled", None, 0.0, False, valid=False))
    (item,) = build_items([m], method_spec("magdi"), tiny_tokenizer)
    assert item.targets[-1] == "garbled\nThe answer is unknown." and item.labels[-1] == 0


# ============================================================================== encode_step
def test_encode_step_deduplicates_within_and_across_items(tiny_tokenizer) -> None:
    # two MAGs of the same question with the same chains: 12 nodes, 5 distinct (prompt, chain) pairs
    mags = [_mag("m1"), _mag("m2")]
    items = build_items(mags, method_spec("magdi"), tiny_tokenizer)
    enc = encode_step(items, tiny_tokenizer, 512, 64)
    assert enc.input_ids.shape[0] == 5 < 12
    assert enc.node_rows[0] == enc.node_rows[1] == [0, 1, 0, 2, 3, 4]
    # a different question is a different prompt: nothing shared
    items = build_items([_mag("m1"), _mag("m3", "What is 2 plus 4?")], method_spec("magdi"), tiny_tokenizer)
    enc = encode_step(items, tiny_tokenizer, 512, 64)
    assert enc.input_ids.shape[0] == 10
    assert set(enc.node_rows[0]).isdisjoint(enc.node_rows[1])


def test_encode_step_labels_padding_and_eos(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    items = build_items([_mag("m1"), _mag("m3", "What is 2 plus 4?")], method_spec("magdi"), tok)
    enc = encode_step(items, tok, 512, 64)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    seen = set()
    for it, rows in zip(items, enc.node_rows, strict=True):
        p = tok(it.prompt, add_special_tokens=False)["input_ids"]
        for t, row in zip(it.targets, rows, strict=True):
            seen.add(row)
            tgt = tok(t, add_special_tokens=False)["input_ids"] + [eos]
            n = len(p) + len(tgt)
            assert enc.input_ids[row, :n].tolist() == p + tgt
            assert enc.input_ids[row, n:].eq(pad).all()
            assert enc.attention_mask[row].tolist() == [1] * n + [0] * (enc.input_ids.shape[1] - n)
            lab = enc.labels[row]
            assert lab[: len(p)].eq(-100).all()  # no loss on the prompt
            assert lab[len(p) : n].tolist() == tgt  # the chain, ending with eos
            assert lab[n:].eq(-100).all()  # nor on padding
            assert enc.chain_mask[row].tolist() == [0] * len(p) + [1] * len(tgt) + [0] * (lab.numel() - n)
    assert seen == set(range(enc.input_ids.shape[0]))
    assert enc.n_tokens == int(enc.attention_mask.sum())


def test_encode_step_truncation(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    (item,) = build_items([_mag()], method_spec("sit_a"), tok)
    enc = encode_step([item], tok, 8, 4)
    p = tok(item.prompt, add_special_tokens=False)["input_ids"]
    t = tok(item.targets[0], add_special_tokens=False)["input_ids"]
    assert len(p) > 8 and len(t) >= 4
    assert enc.input_ids[0].tolist() == p[-8:] + t[:4]  # the prompt keeps its end (the assistant turn)
    assert enc.labels[0].tolist() == [-100] * 8 + t[:4]


# ============================================================================== plan_steps
def test_plan_steps_groups_by_length_and_is_deterministic() -> None:
    sizes = [7, 1, 5, 3, 6, 2, 4]  # prompt length = size, no targets
    items = [TrainItem("x" * s, [], []) for s in sizes]
    steps = plan_steps(items, per_step=2, seed=0, epoch=0)
    by_size = sorted(range(7), key=lambda i: sizes[i])  # [1, 5, 3, 6, 2, 4, 0]
    chunks = [by_size[i : i + 2] for i in range(0, 7, 2)]
    assert sorted(steps) == sorted(chunks)  # each step holds neighbours in length
    assert plan_steps(items, 2, 0, 0) == steps
    for seed, epoch in [(1, 0), (0, 1), (5, 3)]:
        assert sorted(plan_steps(items, 2, seed, epoch)) == sorted(chunks)
    assert len({tuple(map(tuple, plan_steps(items, 2, s, 0))) for s in range(10)}) > 1  # order is shuffled


def test_plan_steps_counts_target_characters() -> None:
    items = [TrainItem("p", ["a" * 10], [1]), TrainItem("p", ["a"], [1]), TrainItem("p", ["a" * 5], [1])]
    assert sorted(plan_steps(items, 1, 0, 0)) == [[0], [1], [2]]
    assert sorted(plan_steps(items, 2, 0, 0)) == [[0], [1, 2]]


# ============================================================================== MagdiStudent
def _items(tok, method: str = "magdi", n: int = 2):
    mags = [_mag(f"m{i}", f"What is 2 plus {3 + i}?") for i in range(n)]
    return build_items(mags, method_spec(method), tok)


def test_forward_loss_is_the_weighted_sum_of_its_parts(make_lm, tiny_tokenizer) -> None:
    lm = make_lm()
    cfg = _cfg(weights=LossWeights(ntp=0.7, contrastive=0.3, graph=2.0))
    torch.manual_seed(0)
    student = MagdiStudent(lm, method_spec("magdi"), cfg)
    items = _items(tiny_tokenizer)
    enc = encode_step(items, tiny_tokenizer, cfg.max_prompt_tokens, cfg.max_target_tokens)
    out = student(enc, items, step_seed=3)
    assert set(out) == {"ntp", "contrastive", "graph", "loss"}
    assert all(torch.isfinite(v) and v.item() > 0 for v in out.values())
    assert out["loss"].item() == pytest.approx(0.7 * out["ntp"].item() + 0.3 * out["contrastive"].item()
                                               + 2.0 * out["graph"].item(), rel=1e-6)

    # L_ntp from a separate, ordinary LM pass over the positive rows
    rows = [r for rs in enc.node_rows for r in rs]
    labels = [y for it in items for y in it.labels]
    pos = sorted({r for r, y in zip(rows, labels, strict=True) if y == 1})
    with torch.no_grad():
        logits = lm(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        hidden = lm.get_base_model().get_decoder()(input_ids=enc.input_ids,
                                                   attention_mask=enc.attention_mask).last_hidden_state
        ref_ntp = ntp_loss(logits[pos], enc.labels[pos], torch.ones(len(pos), dtype=torch.bool), cfg.ntp_reduction)
        # L_contrastive recomputed with the same pairing seed
        reps = position_weighted_mean(hidden, enc.chain_mask)
        scores = student.score_head(reps)
        gen = torch.Generator().manual_seed(3)
        p_rows, n_rows = [], []
        for it, rs in zip(items, enc.node_rows, strict=True):
            p, n = pair_indices(it.labels, gen)
            p_rows += [rs[i] for i in p.tolist()]
            n_rows += [rs[i] for i in n.tolist()]
        ref_con = margin_ranking_loss(scores[p_rows], scores[n_rows], cfg.margin)
    assert len(p_rows) == 2 * 4  # 4 positives, 2 negatives per MAG -> 4 pairs each
    assert out["ntp"].item() == pytest.approx(ref_ntp.item(), rel=1e-5)
    assert out["contrastive"].item() == pytest.approx(ref_con.item(), rel=1e-5)


@pytest.mark.parametrize("method", ["magdi_cn", "magdi_an"])
def test_forward_disabled_terms(make_lm, tiny_tokenizer, method: str) -> None:
    cfg = _cfg(weights=LossWeights(ntp=0.5, contrastive=0.25, graph=1.0))
    student = MagdiStudent(make_lm(), method_spec(method), cfg)
    assert student.encoder is None
    items = _items(tiny_tokenizer, method)
    out = student(encode_step(items, tiny_tokenizer, 32, 16), items, 0)
    assert "graph" not in out
    expected = 0.5 * out["ntp"].item() + (0.25 * out["contrastive"].item() if method == "magdi_an" else 0.0)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)


def _count_calls(module: torch.nn.Module, counter: list[int]):
    return module.register_forward_hook(lambda *_: counter.append(1))


@pytest.mark.parametrize(("node_repr", "passes"), [("live", [1, 1]), ("frozen", [2, 1])])
def test_one_decoder_pass_per_step(make_lm, tiny_tokenizer, node_repr: str, passes: list[int]) -> None:
    lm = make_lm()
    student = MagdiStudent(lm, method_spec("magdi"), _cfg(node_repr=node_repr))
    decoder, _ = student._backbone()
    items = _items(tiny_tokenizer)
    for expected in passes:  # the same step twice (e.g. the next epoch)
        dec_calls, top_calls = [], []
        hooks = [_count_calls(decoder, dec_calls), _count_calls(lm.get_base_model(), top_calls)]
        out = student(encode_step(items, tiny_tokenizer, 32, 16), items, 0)
        out["loss"].backward()
        for h in hooks:
            h.remove()
        # live: L_ntp, L_contrastive and L_graph all reuse one pass; frozen adds one no-grad base-model
        # pass the first time a chain is seen, then reads the cache
        assert len(dec_calls) == expected
        assert top_calls == []  # never the full-vocabulary forward of the causal-LM wrapper


def _lora(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}


@pytest.mark.parametrize(
    ("method", "weights", "encoder"),
    [("magdi", {"ntp": 0.0, "contrastive": 0.0, "graph": 1.0}, "gcn"),
     ("magdi", {"ntp": 0.0, "contrastive": 0.0, "graph": 1.0}, "token_attention"),
     ("magdi_an", {"ntp": 0.0, "contrastive": 1.0, "graph": 0.0}, "gcn")],
)
@pytest.mark.parametrize("node_repr", ["live", "frozen"])
def test_structure_losses_reach_lora_only_when_live(make_lm, tiny_tokenizer, method, weights, encoder,
                                                    node_repr) -> None:
    lm = make_lm()
    torch.manual_seed(0)
    cfg = _cfg(node_repr=node_repr, encoder=encoder, weights=LossWeights(**weights))
    student = MagdiStudent(lm, method_spec(method), cfg)
    student.train()
    params = dict(student.named_parameters())
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    lora_a = [n for n in trainable if "lora_A" in n]
    lora_b = [n for n in trainable if "lora_B" in n]
    assert len(lora_a) == len(lora_b) == 2 * 2  # 2 layers x (q_proj, v_proj)
    assert all(before[n].eq(0).all() for n in lora_b)  # peft starts lora_B at 0
    opt = torch.optim.AdamW(list(trainable.values()), lr=1e-2, weight_decay=0.0)
    items = _items(tiny_tokenizer, method)
    out = student(encode_step(items, tiny_tokenizer, 32, 16), items, 0)
    out["loss"].backward()
    opt.step()
    changed = {n for n, p in trainable.items() if not torch.equal(before[n], p.detach())}
    head = "encoder." if method == "magdi" else "score_head."
    head_params = [n for n in trainable if n.startswith(head)]
    assert head_params and set(head_params) <= changed  # the structure head always learns
    if node_repr == "live" or method == "magdi_an":
        # gradients flow through the pooled hidden states into every adapter (the contrastive loss always
        # uses the live student, as in the official code); at step 0 lora_B = 0, so only lora_B has a
        # gradient (d/dA of B·A·x is Bᵀ·… = 0)
        assert set(lora_b) <= changed
        assert not set(lora_a) & changed
    else:
        # frozen: the structure encoder reads constants, so L_graph does not train the student itself,
        # whatever the encoder (token_attention included)
        assert not (set(lora_a) | set(lora_b)) & changed
        assert all(trainable[n].grad is None or trainable[n].grad.eq(0).all() for n in lora_a + lora_b)


@pytest.mark.parametrize("encoder", ["gcn", "token_attention"])
def test_frozen_reps_come_from_the_base_model(make_lm, tiny_tokenizer, encoder: str) -> None:
    lm = make_lm()
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a trained adapter
    items = _items(tiny_tokenizer)
    enc = encode_step(items, tiny_tokenizer, 32, 16)
    live = MagdiStudent(lm, method_spec("magdi"), _cfg(node_repr="live", encoder=encoder))
    frozen = MagdiStudent(lm, method_spec("magdi"), _cfg(node_repr="frozen", encoder=encoder))
    hidden = live._backbone()[0](input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    reps_live = position_weighted_mean(hidden, enc.chain_mask)
    r_live, h_live, m_live = live._graph_inputs(hidden, reps_live, enc, items)
    r_frozen, h_frozen, m_frozen = frozen._graph_inputs(hidden, reps_live, enc, items)
    base = make_lm(lora=False)
    h_base = base.get_decoder()(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    assert r_live is reps_live and h_live is hidden
    assert not r_frozen.requires_grad and r_live.requires_grad
    assert torch.allclose(r_frozen, position_weighted_mean(h_base, enc.chain_mask), atol=1e-5)
    assert not torch.allclose(r_frozen, r_live, atol=1e-3)
    if encoder == "token_attention":  # the chain's own base-model token states, left-aligned
        assert not h_frozen.requires_grad
        for i in range(enc.input_ids.shape[0]):
            want = h_base[i][enc.chain_mask[i].bool()]
            assert int(m_frozen[i].sum()) == want.shape[0]
            assert torch.allclose(h_frozen[i, : want.shape[0]], want, atol=1e-5)
    # the adapter is enabled again afterwards
    again = live._backbone()[0](input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    assert torch.equal(again, hidden)
    # a cached chain keeps its value when it comes back in another batch (another padding width)
    one = [items[1]]
    enc1 = encode_step(one, tiny_tokenizer, 32, 16)
    r1, _, _ = frozen._graph_inputs(None, None, enc1, one)
    assert torch.equal(r1[enc1.node_rows[0]], r_frozen[enc.node_rows[1]])


def test_frozen_cache_runs_the_base_model_on_new_fused_rows_only(make_lm, tiny_tokenizer) -> None:
    """Fused core: a step whose rows are partly cached sends only the new rows through the base model, and
    they get the same values as in a full pass (rows are independent there)."""
    lm = make_lm()
    items = _items(tiny_tokenizer)
    enc = encode_step(items, tiny_tokenizer, 32, 16)
    full = MagdiStudent(lm, method_spec("magdi"), _cfg(node_repr="frozen", core="fused", attention="sdpa"))
    r_full, _, _ = full._graph_inputs(None, None, enc, items)
    part = MagdiStudent(lm, method_spec("magdi"), _cfg(node_repr="frozen", core="fused", attention="sdpa"))
    one = [items[0]]
    part._graph_inputs(None, None, encode_step(one, tiny_tokenizer, 32, 16), one)
    seen = []
    hook = part._backbone()[0].register_forward_hook(lambda m, a, kw, out: seen.append(kw["input_ids"].shape[0]),
                                                     with_kwargs=True)
    r_part, _, _ = part._graph_inputs(None, None, enc, items)
    hook.remove()
    new_rows = len({r for rows in enc.node_rows[1:] for r in rows} - set(enc.node_rows[0]))
    assert seen == [new_rows] and new_rows < enc.input_ids.shape[0]
    assert torch.allclose(r_part, r_full, atol=1e-5)


# ============================================================================== train(): checkpoints and resume
def _train_mags() -> list[MAG]:
    """6 tiny MAGs of different shapes (G0 all-correct, G1 mixed, an invalid node)."""
    mags = []
    for i in range(6):
        q = f"What is 2 plus {i}?"
        gold = str(2 + i)
        if i % 3 == 0:
            nodes = [Node(a, 0, f"2 plus {i} is {gold}", gold, 0.9, True) for a in "abc"]
        else:
            nodes = [Node("a", 0, f"add {i} to 2", gold, 0.9, True),
                     Node("b", 0, "I guess 9", "9", 0.5, False),
                     Node("c", 0, "hmm", None, 0.0, False, valid=(i % 3 != 2)),
                     Node("a", 1, f"still {gold}", gold, 0.9, True),
                     Node("b", 1, f"ok {gold}", gold, 0.8, True),
                     Node("c", 1, "maybe 1", "1", 0.4, False)]
        mags.append(MAG(f"t{i}", "gsm8k", q, gold, nodes))
    return mags


def _run(make_lm, tok, out: Path, stop_after: int | None = None, method: str = "magdi"):
    lm = make_lm()
    spec = method_spec(method)
    items = build_items(_train_mags(), spec, tok)
    res = train(lm, tok, items, spec, _cfg(), out, stop_after=stop_after)
    return res, _lora(lm)


def test_train_end_to_end_writes_safetensors_checkpoints(make_lm, tiny_tokenizer, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    init = _lora(make_lm())
    out = tmp_path / "run"
    res, lora = _run(make_lm, tiny_tokenizer, out)
    assert res.steps == 3 and res.n_items == 6 and res.resumed_from == 0
    assert [h["step"] for h in res.history] == [1, 2, 3]
    for h in res.history:
        assert {"loss", "ntp", "contrastive", "graph", "lr"} <= set(h)
        assert all(math.isfinite(h[k]) for k in ("loss", "ntp", "contrastive", "graph"))
    assert res.n_unique_sequences < sum(len(m.nodes) for m in _train_mags())  # G0 chains deduplicated
    assert any(not torch.equal(init[n], lora[n]) for n in lora)  # it trained
    ckpt = out / "checkpoint"
    assert {p.name for p in ckpt.iterdir()} == {"trainable.safetensors", "optimizer.safetensors", "state.json"}
    pickles = [p for p in out.rglob("*") if p.suffix in {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}]
    assert pickles == []
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 3 and state["history"] == res.history
    saved = load_file(str(ckpt / "trainable.safetensors"))
    assert any(k.startswith("encoder.") for k in saved) and any(k.startswith("score_head.") for k in saved)
    lora_keys = [k for k in saved if "lora_" in k]
    assert len(lora_keys) == 8
    for k in lora_keys:
        assert torch.equal(saved[k], lora[k.removeprefix("lm.")])
    # a finished run resumes to nothing
    again, lora_again = _run(make_lm, tiny_tokenizer, out)
    assert again.resumed_from == 3 and again.history == res.history
    assert all(torch.equal(lora_again[n], lora[n]) for n in lora)


def test_train_is_deterministic(make_lm, tiny_tokenizer, tmp_path: Path) -> None:
    r1, w1 = _run(make_lm, tiny_tokenizer, tmp_path / "one")
    r2, w2 = _run(make_lm, tiny_tokenizer, tmp_path / "two")
    assert r1.history == r2.history
    assert all(torch.equal(w1[n], w2[n]) for n in w1)


def test_train_resume_matches_uninterrupted_run(make_lm, tiny_tokenizer, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    full, w_full = _run(make_lm, tiny_tokenizer, tmp_path / "full")
    part, _ = _run(make_lm, tiny_tokenizer, tmp_path / "resumed", stop_after=2)  # "killed" after step 2
    assert part.steps == 2
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())["step"] == 2
    rest, w_rest = _run(make_lm, tiny_tokenizer, tmp_path / "resumed")  # a fresh process and model
    assert rest.resumed_from == 2
    assert [h["step"] for h in rest.history] == [1, 2, 3]
    for a, b in zip(rest.history, full.history, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-6), k
    for n in w_full:
        assert torch.allclose(w_rest[n], w_full[n], atol=1e-6), n
    # heads and optimizer state end up the same too
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        x = load_file(str(tmp_path / "full" / "checkpoint" / name))
        y = load_file(str(tmp_path / "resumed" / "checkpoint" / name))
        assert x.keys() == y.keys()
        for k in x:
            assert torch.allclose(x[k].float(), y[k].float(), atol=1e-6), (name, k)


@pytest.mark.parametrize("encoder", ["node_attention", "token_attention"])
def test_attention_encoders_train_the_student_when_live(make_lm, tiny_tokenizer, encoder: str) -> None:
    lm = make_lm()
    cfg = _cfg(encoder=encoder, weights=LossWeights(ntp=0.0, contrastive=0.0, graph=1.0))
    student = MagdiStudent(lm, method_spec("magdi"), cfg)
    items = _items(tiny_tokenizer)
    out = student(encode_step(items, tiny_tokenizer, 32, 16), items, 0)
    assert torch.isfinite(out["graph"])
    out["loss"].backward()
    grads = [p.grad for n, p in lm.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("encoder", ["gcn", "node_attention", "token_attention"])
def test_forward_backward_on_cuda(make_lm, tiny_tokenizer, encoder: str) -> None:
    from magdi.train import Encoded

    student = MagdiStudent(make_lm(), method_spec("magdi"), _cfg(encoder=encoder)).cuda()
    items = _items(tiny_tokenizer)
    enc = encode_step(items, tiny_tokenizer, 32, 16)
    enc = Encoded(enc.input_ids.cuda(), enc.attention_mask.cuda(), enc.labels.cuda(), enc.chain_mask.cuda(),
                  enc.node_rows, enc.n_tokens)
    out = student(enc, items, 0)
    out["loss"].backward()
    assert out["loss"].device.type == "cuda" and torch.isfinite(out["loss"])


# ============================================================================== lr schedule and accumulation
# 6 MAGs, 1 per micro-step, 2 epochs = 12 micro-steps; warm-up 25 % of the updates. By hand, per update u
# of n with W = round(0.25 n) warm-up updates: lr = u / W while u < W, then (n - u) / (n - W).
_LR_BY_HAND = {
    1: [0, 1 / 3, 2 / 3, 1, 8 / 9, 7 / 9, 6 / 9, 5 / 9, 4 / 9, 3 / 9, 2 / 9, 1 / 9],  # n=12, W=3
    2: [0, 1 / 2, 1, 3 / 4, 2 / 4, 1 / 4],  # n=6, W=2 (round(1.5) = 2)
    4: [0, 1, 1 / 2],  # n=3, W=1
}


def _sched_run(make_lm, tok, out: Path, grad_accum: int, stop_after: int | None = None):
    spec = method_spec("magdi_cn")
    items = build_items(_train_mags(), spec, tok)
    cfg = _cfg(mags_per_step=1, epochs=2, grad_accum=grad_accum, warmup_ratio=0.25, checkpoint_every=1)
    return train(make_lm(), tok, items, spec, cfg, out, stop_after=stop_after)


@pytest.mark.parametrize("grad_accum", [1, 2, 4])
def test_lr_schedule_by_hand_with_accumulation_and_resume(make_lm, tiny_tokenizer, tmp_path: Path,
                                                          grad_accum: int, monkeypatch) -> None:
    from accelerate import Accelerator

    clips: list[int] = []
    real_clip = Accelerator.clip_grad_norm_
    monkeypatch.setattr(Accelerator, "clip_grad_norm_",
                        lambda self, *a, **k: clips.append(1) or real_clip(self, *a, **k))
    full = _sched_run(make_lm, tiny_tokenizer, tmp_path / "full", grad_accum)
    peak = _cfg().lr
    # every micro-step of one update trains under that update's lr
    expected = [peak * f for f in _LR_BY_HAND[grad_accum] for _ in range(grad_accum)][:12]
    assert [h["lr"] for h in full.history] == pytest.approx(expected, abs=1e-12)
    # clipping (and the update) happen once per accumulated gradient, never on a micro-step's part
    assert len(clips) == len(_LR_BY_HAND[grad_accum])
    assert [h["step"] for h in full.history if "grad_norm" in h] == list(range(grad_accum, 13, grad_accum))

    # a kill after micro-step 4 (an update boundary for 1, 2 and 4) resumes onto the same lr sequence
    _sched_run(make_lm, tiny_tokenizer, tmp_path / "resumed", grad_accum, stop_after=4)
    rest = _sched_run(make_lm, tiny_tokenizer, tmp_path / "resumed", grad_accum)
    assert rest.resumed_from == 4
    assert [h["lr"] for h in rest.history] == pytest.approx(expected, abs=1e-12)
    for a, b in zip(rest.history, full.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_accumulated_update_equals_one_big_step(make_lm, tiny_tokenizer, tmp_path: Path) -> None:
    """grad_accum=2 over 1-item micro-steps gives the gradient of the mean loss of the pair: the first
    update (lr 0 in warm-up aside) is the same as with 2 items per step when warm-up is off."""
    spec = method_spec("magdi_r0")
    items = build_items(_train_mags()[:2], spec, tiny_tokenizer)
    lm1, lm2 = make_lm(), make_lm()
    # chain reduction: the mean over micro-steps of per-chain means is the two-item step's mean (a token mean would
    # weigh the micro-steps by their token counts)
    cfg = dict(epochs=1, warmup_ratio=0.0, checkpoint_every=1, ntp_reduction="chain")
    train(lm1, tiny_tokenizer, items, spec, _cfg(mags_per_step=1, grad_accum=2, **cfg), tmp_path / "a")
    train(lm2, tiny_tokenizer, items, spec, _cfg(mags_per_step=2, grad_accum=1, **cfg), tmp_path / "b")
    w1, w2 = _lora(lm1), _lora(lm2)
    assert any(not torch.equal(w1[n], _lora(make_lm())[n]) for n in w1)
    for n in w1:
        assert torch.allclose(w1[n], w2[n], atol=1e-6), n


def test_gcn_dropout_is_a_param(make_lm) -> None:
    student = MagdiStudent(make_lm(), method_spec("magdi"), _cfg(gcn_dropout=0.5))
    assert student.encoder.dropout.p == 0.5
    assert MagdiStudent(make_lm(), method_spec("magdi"), _cfg()).encoder.dropout.p == 0.0


# ============================================================================== paper batching
def test_plan_steps_reshuffles_every_epoch_and_groups_inside_buckets() -> None:
    sizes = [(7 * i) % 40 for i in range(40)]
    items = [TrainItem("x" * s, [], []) for s in sizes]
    e0, e1 = plan_steps(items, 2, 0, 0), plan_steps(items, 2, 0, 1)
    for steps in (e0, e1):
        assert sorted(i for s in steps for i in s) == list(range(40))  # each item once per epoch
        assert len(steps) == 20 and all(len(s) == 2 for s in steps)
    assert {frozenset(s) for s in e0} != {frozenset(s) for s in e1}  # new batches, not only a new order
    assert plan_steps(items, 2, 0, 1) == e1  # seeded
    # inside buckets of 4 steps (8 items) each step takes neighbours in length: less padding than the
    # shuffled order chunked as is
    spread = sum(abs(sizes[a] - sizes[b]) for a, b in e0)
    rng = __import__("random").Random(0)
    order = list(range(40))
    rng.shuffle(order)
    assert spread < sum(abs(sizes[order[i]] - sizes[order[i + 1]]) for i in range(0, 40, 2))


def test_official_pairs_and_update_size_by_hand() -> None:
    items = [TrainItem("p", ["a", "b", "c"], [1, 1, 0]),  # max(2, 1) = 2 pairs
             TrainItem("p", ["a", "b", "c"], [1, 1, 1]),  # no negative: paired with "NA" -> 3
             TrainItem("p", ["a", "b"], [0, 0]),  # no positive: the official code skips it -> 0
             TrainItem("p", ["a", "b", "c", "d"], [1, 0, 0, 0])]  # minority positive repeated -> 3
    assert [official_pairs(it) for it in items] == [2, 3, 0, 3]
    # 8 pairs at 4 per update = 2 official updates per epoch over 4 MAGs
    assert items_per_step(items, _cfg(pairs_per_update=4)) == 2
    assert items_per_step(items, _cfg(pairs_per_update=4, grad_accum=2)) == 1  # 2 micro-steps per update
    assert items_per_step(items, _cfg(pairs_per_update=100)) == 4  # at least one update
    assert items_per_step(items, _cfg(mags_per_step=3)) == 3  # unset: mags_per_step


def test_train_sizes_updates_by_official_pairs(make_lm, tiny_tokenizer, tmp_path: Path) -> None:
    spec = method_spec("magdi")
    items = build_items(_train_mags(), spec, tiny_tokenizer)
    pairs = sum(official_pairs(it) for it in items)
    assert pairs == 2 * 3 + 4 * 3  # two G0 MAGs (3 positives), four mixed (3 pos, 3 neg)
    res = train(make_lm(), tiny_tokenizer, items, spec, _cfg(pairs_per_update=6, mags_per_step=6), tmp_path)
    assert res.steps == 3  # 18 pairs / 6 per update = 3 updates of 2 MAGs, not 1 step of 6 MAGs


def test_gradient_checkpointing_same_loss_and_grads(make_lm, tiny_tokenizer) -> None:
    items = _items(tiny_tokenizer)
    enc = encode_step(items, tiny_tokenizer, 32, 16)
    grads, losses, layer_calls = [], [], []
    for ckpt in (False, True):
        lm = make_lm()
        torch.manual_seed(0)
        student = MagdiStudent(lm, method_spec("magdi"), _cfg(gradient_checkpointing=ckpt))
        student.train()
        calls: list[int] = []
        layer = lm.get_base_model().get_decoder().layers[0]
        # the layer's forward is checkpointed (its own hooks stay outside): count a submodule's calls
        h = layer.self_attn.register_forward_pre_hook(lambda *_, c=calls: c.append(1))
        out = student(enc, items, 0)
        out["loss"].backward()
        h.remove()
        losses.append(out["loss"].item())
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad})
        layer_calls.append(len(calls))
    assert layer_calls == [1, 2]  # checkpointing is on: the layer is re-run in backward
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
    assert any(g.abs().sum() > 0 for n, g in grads[1].items() if "lora_B" in n)


def test_base_model_unwraps_peft_and_passes_a_plain_model_through(make_lm) -> None:
    from magdi.train import base_model

    lm = make_lm()  # LoRA-wrapped
    inner = lm.get_base_model()
    assert base_model(lm) is inner and base_model(inner) is inner
    assert not hasattr(inner, "get_base_model")


def test_fsdp_and_deepspeed_refused_before_any_step() -> None:
    """FSDP shards parameters and optimiser state, which the checkpoints cannot save yet; DeepSpeed's engine
    would step, clip and schedule in place of this loop: both fail at start."""
    from magdi.train import check_distributed

    for bad, name in (("DistributedType.FSDP", "FSDP"), ("DistributedType.DEEPSPEED", "DeepSpeed")):
        with pytest.raises(RuntimeError, match=rf"under {name} is not supported: .*accelerate_ddp\.yaml"):
            check_distributed(bad)
    for ok in ("DistributedType.NO", "DistributedType.MULTI_GPU"):
        check_distributed(ok)


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The environment of a plain process: none of the launchers' world-size variables, no ACCELERATE_USE_CPU."""
    from magdi.launch import WORLD_SIZE_ENV

    for key in (*WORLD_SIZE_ENV, "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


@pytest.mark.parametrize(("env", "n"), [({}, 1), ({"WORLD_SIZE": "4"}, 4), ({"OMPI_COMM_WORLD_SIZE": "3"}, 3),
                                         ({"PMI_SIZE": "2", "WORLD_SIZE": "1"}, 1), ({"MV2_COMM_WORLD_SIZE": "2"}, 2)])
def test_launched_processes_reads_the_launchers_variables(no_launcher: pytest.MonkeyPatch, env: dict, n: int) -> None:
    """torchrun / accelerate set WORLD_SIZE, MPI launchers their own variables (accelerate's list and order: the
    first one set wins); none set = one plain process."""
    from magdi.launch import launched_processes

    for key, value in env.items():
        no_launcher.setenv(key, value)
    assert launched_processes() == n


def test_a_plain_process_is_the_main_one_and_an_unseen_launch_is_refused(no_launcher: pytest.MonkeyPatch) -> None:
    """One process (no launcher) writes its results. A launcher's N processes that accelerate runs as independent
    single processes (torchrun without GPUs and without ACCELERATE_USE_CPU=1) would each train everything and write the same
    files: refused in one line saying what to launch. (Real ranks: test_ddp_on_two_cpu_processes.)"""
    from magdi.launch import is_main_process

    assert is_main_process() is True
    no_launcher.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"started 2 processes but accelerate runs them as 1 .*ACCELERATE_USE_CPU=1 torchrun"):
        is_main_process()


@pytest.mark.parametrize(("own", "step_items", "processes", "share"),
                         [(2, 2, 1, 1.0), (2, 3, 2, 4 / 3), (1, 3, 2, 2 / 3), (0, 1, 2, 0.0), (1, 1, 2, 2.0),
                          (4, 16, 4, 1.0)])
def test_rank_share_by_hand(own: int, step_items: int, processes: int, share: float) -> None:
    """A step of 3 MAGs on 2 ranks (2 + 1): weights 4/3 and 2/3, so DDP's mean of the ranks' gradients is
    (2 g_a + 1 g_b) / 3, each MAG counted once; a rank without a MAG weighs 0; one process or an even split 1."""
    from magdi.train import rank_share

    assert rank_share(own, step_items, processes) == pytest.approx(share)


def _ddp_mags() -> list[MAG]:
    """7 MAGs of one shape (same chains, pairs and labelled nodes each), so the mean over a step's MAGs is the
    same whichever way the MAGs are split across ranks, and DDP must reproduce one process's training."""
    words = ["apples", "river bank", "options (A) (B) (C)", "confidence", "previous round", "step by step",
             "the answer"]
    mags = []
    for i, w in enumerate(words):  # different texts (so the MAGs pull the weights apart), one structure
        right, wrong = str(i + 3), str(i + 9)
        nodes = [Node("a", 0, f"{w} {i} gives {right}", right, 0.9, True),
                 Node("b", 0, f"{w} twice is {wrong}", wrong, 0.8, False),
                 Node("c", 0, f"{w} {i} gives {right}", right, 0.7, True),
                 Node("a", 1, f"I agree, {right}", right, 0.9, True),
                 Node("b", 1, f"{w}: I was wrong, {right}", right, 0.9, True),
                 Node("c", 1, f"Now I think {wrong} {w}", wrong, 0.6, False)]
        mags.append(MAG(f"d{i}", "gsm8k", f"Tom has {i} {w}; what is {i} plus 3?" * (1 + i % 2), right, nodes))
    return mags


def test_checkpoint_id_tells_checkpoints_apart(tmp_path: Path) -> None:
    """What ranks compare before resuming: none -> 0; the same state.json bytes -> the same id on every machine;
    a stale copy at the same step (other history) -> another id."""
    from magdi.train import checkpoint_id

    a, b, c = (tmp_path / n for n in "abc")
    for d, text in ((a, '{"step": 2, "history": [1.5]}'), (b, '{"step": 2, "history": [1.5]}'),
                    (c, '{"step": 2, "history": [1.25]}')):
        d.mkdir()
        (d / "state.json").write_text(text)
    assert checkpoint_id(None) == 0
    assert checkpoint_id(a) == checkpoint_id(b) != checkpoint_id(c)
    assert -(2**63) <= checkpoint_id(c) < 2**63  # fits the int64 tensor the ranks gather


def _ddp_cfg() -> TrainCfg:
    # chain reduction: a rank's L_ntp weighted by its share of the step's MAGs is then exactly the one-process mean
    # (with token reduction ranks with more tokens would weigh more; the DDP weighting is by MAGs)
    return _cfg(mags_per_step=3, grad_accum=2, ntp_reduction="chain")


def test_ddp_on_two_cpu_processes(make_lm, tiny_tokenizer, tmp_path: Path) -> None:
    """A real two-process DDP run (torchrun, gloo on the CPU, tests/_ddp_worker.py): 7 MAGs, 3 per step (split
    2 + 1, and a step of 1 MAG that leaves rank 1 without one), 2 steps per update (no_sync, then a short last
    window).

    Both ranks end with the same LoRA weights, which match one process training on all MAGs (the ranks' losses
    weighted by their share of the step, ``rank_share``: equal weights would give the lone MAG of a 2 + 1 split
    half the step's weight instead of a third); the
    logged losses are the step's, not rank 0's share, and equal on both ranks; tokens and sequences are summed
    over ranks; only rank 0 is the main process; a rank that cannot see rank 0's checkpoint refuses to resume.
    """
    import os
    import subprocess
    import sys

    spec = method_spec("magdi")
    items = build_items(_ddp_mags(), spec, tiny_tokenizer)
    # the checkpoint rank 0 will find (rank 1's folder stays empty)
    train(make_lm(), tiny_tokenizer, items, spec, _ddp_cfg(), tmp_path / "resume0", stop_after=2)
    one_lm = make_lm()
    one = train(one_lm, tiny_tokenizer, items, spec, _ddp_cfg(), tmp_path / "one")
    assert one.steps == 3 and sorted(len(s) for s in plan_steps(items, 3, 0, 0, _ddp_cfg().bucket_steps)) == [1, 3, 3]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", str(ROOT / "tests" / "_ddp_worker.py"),
           str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["main"], r1["main"], r0["world"], r1["world"]) == (True, False, 2, 2)
    for r in (r0, r1):
        assert "would resume from different checkpoints (steps [2, 0])" in r["resume_error"]
        assert (r["steps"], r["tokens"], r["sequences"]) == (one.steps, one.tokens, one.n_unique_sequences)
    assert r0["lora"] == r1["lora"] and r0["history"] == r1["history"]
    for got, want in zip(r0["history"], one.history, strict=True):
        assert set(got) == set(want)  # grad_norm on update steps only
        for key in set(want) & {"loss", "ntp", "contrastive", "graph", "grad_norm"}:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (got["step"], key)
    for name, want in _lora(one_lm).items():
        torch.testing.assert_close(torch.tensor(r0["lora"][name]), want, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint"]


@pytest.mark.parametrize("rank", ["1", "0"])
def test_stage_train_writes_results_on_rank_0_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank: str) -> None:
    """A rank > 0 trains (DDP collectives need every rank) and returns without saving, hashing or writing any
    file; rank 0 saves the adapter and writes the metrics. The model, LoRA and the loop are stubbed: this is about
    who writes, not about training."""
    import magdi.pipeline.training as pl
    import magdi.student as st
    import magdi.train as tr
    from magdi.config import parse_params

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pl, "is_main_process", lambda: rank == "0")
    monkeypatch.setenv("MAGDI_THREADS", str(torch.get_num_threads()))  # _set_threads: leave the process as it is
    calls: list[str] = []
    monkeypatch.setattr(st, "load_student", lambda *a, **k: (object(), object()))
    monkeypatch.setattr(st, "attach_lora", lambda lm, *a, **k: lm)
    monkeypatch.setattr(pl, "_select_mags", lambda *a: [])
    monkeypatch.setattr(tr, "build_items", lambda *a: [])
    monkeypatch.setattr(tr, "truncation_stats", lambda *a: {})
    monkeypatch.setattr(tr, "train", lambda *a, **k: calls.append("train") or tr.TrainResult(0, 0, 0, 0, 0.0, [], 0))
    monkeypatch.setattr(tr, "save_adapter", lambda lm, out: calls.append("save") or "ab" * 32)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"] = {**raw["paths"], "runs_dir": str(tmp_path / "runs"), "tracking_uri": f"sqlite:///{tmp_path}/m.db"}
    summary = pl.stage_train(parse_params(raw), "svamp", "magdi")
    written = sorted(str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*") if f.is_file())
    if rank == "1":
        assert (calls, summary, written) == (["train"], {}, [])
    else:
        assert calls == ["train", "save"] and summary["adapter_sha256"] == "ab" * 32
        assert {"metrics/train/magdi/svamp.json", "metrics/train/magdi/svamp_history.csv"} <= set(written)
        # the precision as resolved from the setting written in params.yaml (auto; conftest: an AVX2-only CPU)
        assert summary["numerics"]["precision"]["setting"] == "auto"
        assert summary["numerics"]["precision"]["reason"] == "float32: CPU has AVX2, no native bf16"
        cfg = json.loads((tmp_path / "runs" / "train" / "svamp" / "magdi" / "config.json").read_text())
        assert cfg["train"]["bf16"] is False and cfg["precision"] == "float32: CPU has AVX2, no native bf16"


def test_saved_adapter_config_does_not_depend_on_set_order(tmp_path: Path, tiny_lm) -> None:
    """peft writes `target_modules` (a set) in iteration order, which follows PYTHONHASHSEED; the saved config
    lists them sorted whatever that order, so identical runs write identical folders, and it loads back."""
    from peft import PeftConfig

    from magdi.train import save_adapter

    class Reversed(set):  # iterates against sorted order, as some hash seeds do
        def __iter__(self):
            return iter(sorted(set.__iter__(self), reverse=True))

    conf = tiny_lm.peft_config["default"]
    conf.target_modules = Reversed(conf.target_modules)
    assert list(conf.target_modules) == sorted(conf.target_modules, reverse=True) and len(conf.target_modules) > 1
    save_adapter(tiny_lm, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] == sorted(conf.target_modules)
    assert set(PeftConfig.from_pretrained(str(tmp_path)).target_modules) == set(conf.target_modules)


@pytest.mark.parametrize("stage", ["download", "prepare_student", "evaluate", "build_mags", "report"])
@pytest.mark.parametrize("variable", ["WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"])
def test_stages_other_than_training_refuse_a_multi_process_launch(no_launcher: pytest.MonkeyPatch,
                                                                  stage: str, variable: str) -> None:
    """Under `accelerate launch` (or an MPI launcher) every rank would repeat the stage's work (every test
    question, every teacher call, every model file) and write the same files: those stages fail at once, before
    loading anything; one process passes."""
    import magdi.pipeline as pl
    from magdi.config import parse_params
    from magdi.report import build_report

    p = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    no_launcher.setenv(variable, "2")
    call = {"download": lambda: pl.stage_download(p), "prepare_student": lambda: pl.stage_prepare_student(p),
            "evaluate": lambda: pl.stage_evaluate(p, "svamp", "magdi"),
            "build_mags": lambda: pl.stage_build_mags(p, "svamp"),
            "report": lambda: build_report(p, Path("never-written"))}[stage]
    with pytest.raises(RuntimeError, match=rf"^{stage} runs as one process, not 2 .*accelerate launch"):
        call()
    no_launcher.setenv(variable, "1")
    from magdi.launch import single_process

    single_process(stage)


# ============================================================================== gradient clipping (train.max_grad_norm)
@pytest.mark.parametrize("with_accel", [True, False], ids=["accelerator", "bare"])
@pytest.mark.parametrize(("max_norm", "scale"), [(1.0, 1 / 5), (10.0, 1.0), (None, 1.0)])
def test_grad_norm_clips_to_max_norm_or_not_at_all(max_norm: float | None, scale: float, with_accel: bool) -> None:
    """Gradients (3, 4) and (0,) have global L2 norm 5: clipped to 1 they shrink by 1/5; a limit above the
    norm or none at all leaves them as they are; the reported norm is the norm before clipping. The same with
    no Accelerator (``accel=None``, the speed benchmarks' loops) and with a generator of parameters."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0])
    try:
        accel = Accelerator(cpu=True) if with_accel else None
        assert grad_norm(accel, iter([a, b]), max_norm) == pytest.approx(5.0)
        assert a.grad.tolist() == pytest.approx([3.0 * scale, 4.0 * scale], rel=1e-5)
        assert b.grad.tolist() == [0.0]
        if max_norm is None:  # off means untouched, even when the norm overflows (no inf / inf = NaN scaling)
            a.grad = torch.tensor([math.inf, 4.0])
            assert grad_norm(accel, [a, b], None) == math.inf and a.grad.tolist() == [math.inf, 4.0]
    finally:  # a CPU-pinned accelerate state would leak into later tests on a GPU machine
        AcceleratorState._reset_state(reset_partial_state=True)


def test_max_grad_norm_key_validated() -> None:
    assert TrainCfg().max_grad_norm == 1.0 and TrainCfg(max_grad_norm=None).max_grad_norm is None
    with pytest.raises(ValueError, match="max_grad_norm"):
        TrainCfg(max_grad_norm=0)


# ============================================================================== official update count (pairs mode)
def _synthetic_items(n: int, seed: int) -> list[TrainItem]:
    """``n`` MAG items of 3-9 chains with random labels (some all-wrong, some all-right)."""
    rng = __import__("random").Random(seed)
    out = []
    for _ in range(n):
        k = rng.choice([3, 6, 9])
        out.append(TrainItem("p", ["c"] * k, [int(rng.random() < 0.55) for _ in range(k)]))
    return out


@pytest.mark.parametrize(("n", "seed"), [(1000, 0), (997, 1), (123, 2), (50, 3), (7, 4), (1, 5)])
def test_updates_per_epoch_equals_the_official_count(n: int, seed: int) -> None:
    """HF Trainer with 4 pairs per device and 4 accumulation steps makes floor(ceil(P/4)/4) updates an epoch (at
    least one); ours makes that many (within +-1 is the issue's bar; here exactly), for sizes that do not divide."""
    from magdi.train import epoch_layout, official_updates, updates_per_epoch

    items = _synthetic_items(n, seed)
    pairs = sum(official_pairs(it) for it in items)
    official = max(1, -(-pairs // 4) // 4)
    cfg = _cfg(pairs_per_update=16, grad_accum=4)
    assert official_updates(pairs, 16, 4) == official
    assert updates_per_epoch(items, cfg) == min(official, n)
    m, windows = epoch_layout(items, cfg)
    assert sum(windows) == m and max(windows) - min(windows) <= 1 and m <= n
    steps = plan_steps(items, items_per_step(items, cfg), 0, 0, 4, m)
    assert sorted(i for s in steps for i in s) == list(range(n))  # every MAG once
    assert len(steps) == m and max(map(len, steps)) - min(map(len, steps)) <= 1


def test_paper_scale_makes_218_updates_not_125() -> None:
    """1000 MAGs with 3,500 official pairs: the official run's 218 updates per epoch (was 125: whole MAGs per
    micro-step could only give 250, 125, 84, ...)."""
    from magdi.train import updates_per_epoch

    items = [TrainItem("p", ["c"] * 4, [1, 1, 1, 0]) for _ in range(500)]  # 3 pairs each
    items += [TrainItem("p", ["c"] * 4, [1, 1, 1, 1]) for _ in range(500)]  # 4 pairs each
    assert sum(official_pairs(it) for it in items) == 3500
    assert updates_per_epoch(items, _cfg(pairs_per_update=16, grad_accum=4)) == 218


def test_loop_makes_the_official_updates_each_epoch(make_lm, tiny_tokenizer, tmp_path: Path) -> None:
    """6 MAGs of 3 pairs each, 4 pairs per update over 2 accumulation steps: floor(ceil(18/2)/2) = 4 updates per
    epoch from 6 micro-steps (windows 2, 2, 1, 1), 8 over 2 epochs, each window's loss averaged over its steps."""
    from magdi.train import updates_per_epoch

    spec = method_spec("magdi")
    items = build_items(_train_mags(), spec, tiny_tokenizer)
    cfg = _cfg(pairs_per_update=4, grad_accum=2, epochs=2)
    assert updates_per_epoch(items, cfg) == 4
    res = train(make_lm(), tiny_tokenizer, items, spec, cfg, tmp_path / "run")
    assert res.steps == 12 and sum("grad_norm" in r for r in res.history) == 8
    assert [r["step"] for r in res.history if "grad_norm" in r] == [2, 4, 5, 6, 8, 10, 11, 12]


def test_warmup_steps_fixed_or_ratio() -> None:
    from magdi.train import lr_schedule, warmup_updates

    assert (warmup_updates(10, 0.1), warmup_updates(10, 0.1, 3), warmup_updates(2, 0.1, 100)) == (1, 3, 2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_schedule(opt, 10, 0.1, warmup_steps=4)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:6] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 5 / 6])
    with pytest.raises(ValueError, match="multiple of train.grad_accum"):
        _cfg(pairs_per_update=10, grad_accum=4)
