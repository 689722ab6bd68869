"""The evaluation's decoder (magdi.decoding): the same greedy tokens as ``model.generate`` with a shared prefix
prefilled once, length-sorted chunks, an in-place KV cache and finished rows dropped."""

from __future__ import annotations

import pytest
import torch

from magdi.decoding import PreallocatedLayer, common_prefix, greedy_decode, length_chunks, preallocated_cache


def _upto_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


def test_common_prefix_and_length_chunks_by_hand() -> None:
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 9, 9], [1, 2, 3]]) == 2  # each row keeps one token of its own
    assert common_prefix([[5, 1], [6, 1]]) == 0
    assert common_prefix([[1, 2], [1, 2]]) == 1
    # lengths 3, 9, 4, 8, 1 -> longest first: 9 (1), 8 (3), 4 (2), 3 (0), 1 (4); chunks of at most 18 positions
    assert length_chunks([3, 9, 4, 8, 1], 18) == [[1, 3], [2, 0, 4]]
    assert length_chunks([30, 2], 10) == [[0], [1]]  # a row longer than the budget goes alone


def test_preallocated_layer_writes_in_place() -> None:
    lay = PreallocatedLayer(capacity=5)
    k = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).view(2, 1, 3, 2)
    keys, values = lay.update(k, -k)
    assert torch.equal(keys, k) and torch.equal(values, -k) and lay.get_seq_length() == 3
    buf = lay.kbuf.data_ptr()
    keys, _ = lay.update(k[:, :, :1] + 100, k[:, :, :1])
    assert lay.kbuf.data_ptr() == buf and keys.shape[2] == 4 and torch.equal(keys[:, :, 3], k[:, :, 0] + 100)
    lay.batch_select_indices(torch.tensor([1]))
    assert lay.keys.shape[0] == 1 and torch.equal(lay.keys[0, :, :3], k[1])
    with pytest.raises(RuntimeError, match="KV cache full"):
        lay.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert len(preallocated_cache(3, 4).layers) == 3


@pytest.mark.parametrize(("share", "chunk"), [(0.0, 8), (0.125, 4096), (1.0, 1)])
def test_greedy_decode_equals_model_generate(make_lm, tiny_tokenizer, share: float, chunk: int) -> None:
    """Prompts with a shared prefix and different lengths: prefix prefilled once, chunks from one row each to all
    rows in one, rows dropped at every finish, at the default share and never; every row's tokens as
    ``model.generate`` makes them from a left-padded batch."""
    model = make_lm(lora=False).eval()
    prompts = ["Question: What is 2 plus 3?", "Question: Tom has 3 apples and buys 2 more apples. How many?",
               "Question: yes", "Question: The answer is"]
    tiny_tokenizer.padding_side = "left"
    enc = tiny_tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    rows = [tiny_tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert common_prefix(rows) >= 2
    free = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id,
                          eos_token_id=None)[:, enc["input_ids"].shape[1]:].tolist()
    eos = {free[0][2], free[1][6]}  # rows end at different steps
    ref = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id,
                         eos_token_id=sorted(eos))[:, enc["input_ids"].shape[1]:].tolist()
    got = greedy_decode(model, rows, 12, eos, shrink_share=share, chunk_positions=chunk)
    assert got == [_upto_eos(r, eos) for r in ref]
    assert len(got[0]) <= 3 and len(got[1]) <= 7


def test_sample_filter_by_hand() -> None:
    from magdi.decoding import sample_filter

    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    inf = float("-inf")
    # top-k 2 keeps the two highest
    assert torch.isinf(sample_filter(logits, 1.0, 1.0, 2)[0, :2]).all()
    # top-p 0.6: sorted ascending 0.1 0.2 0.3 0.4, cumulative 0.1 0.3 0.6 1.0; drop where cum <= 0.4 -> 0.1, 0.2
    out = sample_filter(logits, 1.0, 0.6, 0)
    assert out[0, 0] == inf and out[0, 1] == inf and torch.isfinite(out[0, 2:]).all()
    # temperature divides the logits
    assert torch.allclose(sample_filter(logits, 2.0, 1.0, 0), logits / 2)
    # top-p that no single token reaches still keeps the most likely one
    assert torch.isfinite(sample_filter(logits, 1.0, 0.01, 0)[0, 3])


def test_samples_share_one_prefill_and_are_seeded(make_lm, tiny_tokenizer) -> None:
    from magdi.decoding import decode

    model = make_lm(lora=False).eval()
    rows = [tiny_tokenizer(p, add_special_tokens=False)["input_ids"] for p in ["Question: 2 plus 3?", "Question: yes"]]
    wide: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _m, args, kw, w=wide: w.append(kw["input_ids"].shape[1]) if kw["input_ids"].shape[1] > 1 else None,
        with_kwargs=True)
    a = decode(model, rows, 6, {-1}, num_samples=4, temperature=1.0, seed=3)
    hook.remove()
    # one prefill of the shared prefix, one of the rest (one chunk): not one per sample
    assert len(wide) == 2
    assert len(a) == 8 and all(len(r) == 6 for r in a)
    assert a == decode(model, rows, 6, {-1}, num_samples=4, temperature=1.0, seed=3)
    assert a != decode(model, rows, 6, {-1}, num_samples=4, temperature=1.0, seed=4)
    greedy = decode(model, rows, 6, {-1})
    assert decode(model, rows, 6, {-1}, num_samples=3, temperature=1.0, top_k=1) == [g for g in greedy for _ in range(3)]
    with pytest.raises(ValueError, match="temperature > 0"):
        decode(model, rows, 6, {-1}, num_samples=2)
