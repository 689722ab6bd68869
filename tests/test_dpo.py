"""Preference optimisation on MAG pairs (methods dpo and magdi_dpo, beyond the paper): the loss by hand, against
TRL's DPO trainer on the same log-probabilities, and inside the student (policy and reference log-probabilities
from the packed or fused pass, the reference cached per chain)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from magdi.config import LossWeights, TrainCfg
from magdi.core import encode_packed
from magdi.losses import dpo_loss, pair_indices
from magdi.mag import MAG, Node
from magdi.train import MagdiStudent, build_items, encode_step, method_spec, train


def _cfg(**kw) -> TrainCfg:
    base = {"mags_per_step": 2, "max_prompt_tokens": 32, "max_target_tokens": 16, "hidden_dim": 16,
            "checkpoint_every": 1, "lr": 1e-2, "epochs": 1, "bf16": False}
    return TrainCfg(**{**base, **kw})


def _mag(i: int) -> MAG:
    """Round 0: a+ b- c+; round 1: a+ b+ c- (4 positives, 2 negatives: 4 pairs)."""
    gold = str(5 + i)
    nodes = [Node("a", 0, f"2 plus {3 + i} is {gold}", gold, 0.9, True),
             Node("b", 0, "2 plus 3 is 6", "6", 0.8, False),
             Node("c", 0, f"adding gives {gold}", gold, 0.7, True),
             Node("a", 1, f"I agree, {gold}", gold, 0.9, True),
             Node("b", 1, f"I was wrong, {gold}", gold, 0.9, True),
             Node("c", 1, "Now I think 6", "6", 0.6, False)]
    return MAG(f"m{i}", "gsm8k", f"What is 2 plus {3 + i}?", gold, nodes)


def _items(tok, method: str = "dpo", n: int = 2):
    return build_items([_mag(i) for i in range(n)], method_spec(method), tok)


# ============================================================================== the loss


def test_dpo_loss_by_hand() -> None:
    pol_pos, pol_neg = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
    ref_pos, ref_neg = torch.tensor([-11.0, -19.0]), torch.tensor([-11.0, -16.0])
    # pair 1: (−10+11) − (−12+11) = 2; pair 2: (−20+19) − (−15+16) = −2; β = 0.5 -> ±1
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0))) / 2  # 0.813262
    assert dpo_loss(pol_pos, pol_neg, ref_pos, ref_neg, beta=0.5).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.813262, abs=1e-6)


def test_dpo_loss_gradient_prefers_the_correct_chain_and_is_stable() -> None:
    pol_pos = torch.tensor([-5.0], requires_grad=True)
    pol_neg = torch.tensor([-5.0], requires_grad=True)
    loss = dpo_loss(pol_pos, pol_neg, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))  # policy = reference: σ(0) = 1/2
    loss.backward()
    # d/d pol_pos of −log σ(β m) at m = 0 is −β/2; the incorrect chain's gradient is the opposite
    assert pol_pos.grad.item() == pytest.approx(-0.05) and pol_neg.grad.item() == pytest.approx(0.05)
    big = dpo_loss(torch.tensor([0.0]), torch.tensor([-1e6]), torch.tensor([0.0]), torch.tensor([0.0]), beta=1.0)
    assert big.item() == 0.0 and math.isfinite(big.item())
    bad = dpo_loss(torch.tensor([-1e6]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=1.0)
    assert bad.item() == pytest.approx(1e6)  # logsigmoid, not log(sigmoid): no inf


def test_dpo_loss_without_pairs_is_a_connected_zero() -> None:
    x = torch.zeros(0, requires_grad=True)
    loss = dpo_loss(x, x, x.detach(), x.detach(), beta=0.1)
    loss.backward()
    assert loss.item() == 0.0 and x.grad is not None
    with pytest.raises(ValueError, match="shapes differ"):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), 0.1)


@pytest.mark.parametrize("normalized", [False, True])
def test_dpo_loss_matches_trl(normalized: bool) -> None:
    """TRL's DPO trainer (``_compute_loss``, loss ``sigmoid`` or its length-normalised ``sigmoid_norm``) on the same
    per-token log-probabilities as ours. TRL's method is run on a stand-in trainer whose model returns those
    log-probabilities, so the two formulas are compared on identical inputs, not two models."""
    from trl import DPOTrainer

    torch.manual_seed(0)
    pairs, width = 3, 9
    completion = torch.zeros(2 * pairs, width, dtype=torch.long)
    lengths = [3, 7, 5, 8, 2, 6]  # chosen rows first, then rejected (TRL's batch layout)
    for b, n in enumerate(lengths):
        completion[b, width - n:] = 1  # the prompt first, then the completion
    shift = completion[:, 1:]
    per_token = -torch.rand(2 * pairs, width - 1) * 3 * shift  # log-probabilities, 0 outside the completion
    ref_logps = -torch.rand(2 * pairs) * 10
    beta = 0.3

    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token),
                              is_top1=torch.zeros_like(per_token, dtype=torch.bool))
    accel = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t)
    stand_in = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accel, aux_loss_enabled=False,
                               ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                               loss_types=["sigmoid_norm" if normalized else "sigmoid"], loss_weights=[1.0],
                               beta=beta, use_weighting=False, _metrics={"train": defaultdict(list)},
                               _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones(2 * pairs, width, dtype=torch.long), "attention_mask": torch.ones_like(completion),
              "completion_mask": completion, "ref_chosen_logps": ref_logps[:pairs],
              "ref_rejected_logps": ref_logps[pairs:]}
    trl_loss = DPOTrainer._compute_loss(stand_in, lambda **_: outputs, inputs, False)

    logp, n = per_token.sum(dim=1), shift.sum(dim=1).float()
    ref = ref_logps
    if normalized:  # ours: per-token means of policy and reference (the same chain: the same count)
        logp, ref = logp / n, ref / n
    ours = dpo_loss(logp[:pairs], logp[pairs:], ref[:pairs], ref[pairs:], beta)
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-6)


# ============================================================================== inside the student


def _perturb_lora(lm, seed: int = 1) -> None:
    """LoRA's B starts at 0 (policy = reference); give it values so the two differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _chain_logps(lm, enc, rows: list[int], adapter: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability and token count of each row's chain, from an ordinary full-vocabulary pass."""
    ctx = lm.disable_adapter() if not adapter else torch.enable_grad()
    with torch.no_grad(), ctx:
        logits = lm(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits.float()
    shift = torch.cat([enc.labels[:, 1:], torch.full_like(enc.labels[:, :1], -100)], dim=1)
    lp = torch.log_softmax(logits, -1).gather(-1, shift.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    lp = lp * (shift != -100)
    return lp.sum(1)[rows], (shift != -100).sum(1)[rows].float()


@pytest.mark.parametrize("normalized", [False, True])
def test_dpo_term_from_policy_and_base_model(make_lm, tiny_tokenizer, normalized: bool) -> None:
    """The student's L_DPO equals dpo_loss on chain log-probabilities computed independently: the policy with
    its adapter, the reference with the adapter disabled, over the pairs MAGDi's pairing draws."""
    lm = make_lm()
    _perturb_lora(lm)
    cfg = _cfg(dpo={"beta": 0.5, "length_normalized": normalized}, weights=LossWeights(ntp=0.7, dpo=2.0))
    student = MagdiStudent(lm, method_spec("dpo"), cfg)
    assert student.score_head is None and student.encoder is None
    items = _items(tiny_tokenizer)
    enc = encode_step(items, tiny_tokenizer, cfg.max_prompt_tokens, cfg.max_target_tokens)
    out = student(enc, items, step_seed=3)
    assert set(out) == {"ntp", "dpo", "loss"}
    assert out["loss"].item() == pytest.approx(0.7 * out["ntp"].item() + 2.0 * out["dpo"].item(), rel=1e-6)

    gen = torch.Generator().manual_seed(3)
    pos, neg = [], []
    for it, rs in zip(items, enc.node_rows, strict=True):
        p, n = pair_indices(it.labels, gen)
        pos += [rs[i] for i in p.tolist()]
        neg += [rs[i] for i in n.tolist()]
    assert len(pos) == 8
    pol_p, n_p = _chain_logps(lm, enc, pos, adapter=True)
    pol_n, n_n = _chain_logps(lm, enc, neg, adapter=True)
    ref_p, _ = _chain_logps(lm, enc, pos, adapter=False)
    ref_n, _ = _chain_logps(lm, enc, neg, adapter=False)
    assert not torch.allclose(pol_p, ref_p)  # the adapter matters here
    if normalized:
        pol_p, ref_p, pol_n, ref_n = pol_p / n_p, ref_p / n_p, pol_n / n_n, ref_n / n_n
    expected = dpo_loss(pol_p, pol_n, ref_p, ref_n, 0.5)
    assert out["dpo"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_packed_and_fused_cores_give_the_same_dpo_term(make_lm, tiny_tokenizer) -> None:
    items = _items(tiny_tokenizer, "magdi_dpo")
    vals = {}
    for core in ("fused", "packed"):
        lm = make_lm()
        _perturb_lora(lm)
        cfg = _cfg(core=core, attention="segments" if core == "packed" else "sdpa")
        student = MagdiStudent(lm, method_spec("magdi_dpo"), cfg)
        enc = (encode_packed(items, tiny_tokenizer, 32, 16) if core == "packed"
               else encode_step(items, tiny_tokenizer, 32, 16))
        torch.manual_seed(0)
        out = student(enc, items, step_seed=5)
        assert set(out) == {"ntp", "dpo", "graph", "loss"}  # magdi_dpo: no margin ranking term
        w = cfg.weights
        assert out["loss"].item() == pytest.approx(w.ntp * out["ntp"].item() + w.graph * out["graph"].item()
                                                   + w.dpo * out["dpo"].item(), rel=1e-5)
        vals[core] = (out["ntp"].item(), out["dpo"].item())
    assert vals["packed"] == pytest.approx(vals["fused"], rel=1e-4)


def test_reference_at_init_and_cached_once(make_lm, tiny_tokenizer) -> None:
    """At LoRA's initialisation the policy is the reference: L_DPO = log 2 exactly. The reference is one no-grad
    pass the first time a chain is seen; the same step again (the next epoch) reads the cache."""
    lm = make_lm()
    student = MagdiStudent(lm, method_spec("dpo"), _cfg(core="packed"))
    decoder, _ = student._backbone()
    items = _items(tiny_tokenizer)
    for passes in (2, 1):
        calls: list[int] = []
        hook = decoder.register_forward_hook(lambda *_, c=calls: c.append(1))
        out = student(encode_packed(items, tiny_tokenizer, 32, 16), items, 0)
        hook.remove()
        assert len(calls) == passes
        assert out["dpo"].item() == pytest.approx(math.log(2), abs=1e-6)
        out["loss"].backward()
    assert len(student.ref_cache) == len({(it.prompt, t) for it in items for t in it.targets})


def test_dpo_training_moves_the_policy_away_from_the_reference(make_lm, tiny_tokenizer, tmp_path) -> None:
    lm = make_lm()
    spec = method_spec("dpo")
    items = _items(tiny_tokenizer, n=4)
    res = train(lm, tiny_tokenizer, items, spec, _cfg(epochs=3, lr=5e-2), tmp_path / "run")
    dpo = [h["dpo"] for h in res.history]
    assert dpo[0] == pytest.approx(math.log(2), abs=1e-6)  # first step: policy = reference
    assert all(math.isfinite(x) for x in dpo) and min(dpo[1:]) < math.log(2)  # pairs now preferred


def test_dpo_methods_are_configured() -> None:
    from magdi.names import BEYOND_PAPER_METHODS, TRAINED_METHODS

    assert set(BEYOND_PAPER_METHODS) <= set(TRAINED_METHODS)
    assert method_spec("dpo").dpo and not method_spec("dpo").contrastive and not method_spec("dpo").graph
    assert method_spec("magdi_dpo").dpo and method_spec("magdi_dpo").graph and not method_spec("magdi_dpo").contrastive
    with pytest.raises(Exception, match="beta"):
        TrainCfg(dpo={"beta": 0})


def test_f_logsigmoid_identity() -> None:  # the form the loss relies on: −log σ(x) = softplus(−x)
    x = torch.linspace(-30, 30, 61)
    assert torch.allclose(-F.logsigmoid(x), F.softplus(-x))


def test_last_epoch_means_by_hand() -> None:
    from magdi.train import last_epoch_means

    hist = [{"step": 1, "epoch": 1, "loss": 9.0, "ntp": 9.0, "lr": 0.1},
            {"step": 2, "epoch": 2, "loss": 2.0, "ntp": 1.0, "lr": 0.1, "grad_norm": 3.0},
            {"step": 3, "epoch": 2, "loss": 4.0, "ntp": 0.0, "lr": 0.0, "grad_norm": 1.0}]
    # the last step alone has L_ntp 0 (no positive chain); the last epoch's mean is (1 + 0) / 2
    assert last_epoch_means(hist) == {"loss": 3.0, "ntp": 0.5}
    assert last_epoch_means([{"step": 1, "loss": 2.0}]) == {"loss": 2.0}  # no epoch key: one epoch
    assert last_epoch_means([]) == {}
