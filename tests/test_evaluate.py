"""Evaluation rules: bootstrap interval, summary, self-consistency vote, and the batched sampling helpers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import magdi.evaluate as ev
from magdi.evaluate import Prediction, bootstrap_ci, evaluate_examples, summarise
from magdi.student import Generation, generate, row_sampling_filter


# ============================================================================== numerics fingerprint
def test_numerics_fingerprint_reads_the_first_processor_and_its_matrix_flags(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = tmp_path / "cpuinfo"
    block = ("processor\t: {i}\nmodel name\t: Test CPU {i}\ncpu family\t: 6\nmodel\t\t: 143\n"
             "flags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile amx_bf16 avx512_fp16 avx512_vnni\n")
    cpu.write_text(block.format(i=0) + "\n" + block.format(i=1))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    fp = ev.numerics_fingerprint(cpu)
    assert fp["cpu_model"] == "Test CPU 0" and fp["cpu_family_model"] == "6/143"
    assert fp["cpu_matrix_flags"] == ["amx_bf16", "amx_tile", "avx512_bf16", "avx512_fp16"]  # not avx512_vnni
    assert fp["onednn_max_cpu_isa"] == "AVX512_CORE_BF16" and fp["threads"] == torch.get_num_threads()
    missing = ev.numerics_fingerprint(tmp_path / "absent")  # not Linux: the torch part only
    assert "cpu_model" not in missing and missing["torch"] == torch.__version__


def test_outputs_digest_is_the_sha256_of_the_ordered_outputs() -> None:
    import hashlib

    def pred(i: str, out: str, correct: bool = True) -> Prediction:
        return Prediction(id=i, task="svamp", output=out, parsed=None, gold="1", correct=correct, n_tokens=3)

    a = [pred("q1", "The answer is 1."), pred("q2", "Étape: 2")]
    by_hand = hashlib.sha256('["q1", "The answer is 1.", null]\n["q2", "Étape: 2", null]\n'.encode()).hexdigest()
    assert ev.outputs_digest(a) == by_hand
    assert ev.outputs_digest([pred("q1", "The answer is 1.", correct=False), a[1]]) == by_hand  # not correctness
    assert ev.outputs_digest(a[::-1]) != by_hand  # order matters
    assert ev.outputs_digest([a[0], pred("q2", "Étape: 2 ")]) != by_hand  # one character of one output
    sc = Prediction(id="q1", task="svamp", output="1", parsed="1", gold="1", correct=True, n_tokens=3,
                    samples=["1", "2"])  # self-consistency: the samples count too
    assert ev.outputs_digest([sc]) == hashlib.sha256(b'["q1", "1", ["1", "2"]]\n').hexdigest()


# ============================================================================== bootstrap / summary
def test_bootstrap_ci_degenerate_cases() -> None:
    assert bootstrap_ci([], 100, 0) == (0.0, 0.0)
    assert bootstrap_ci([True] * 7, 200, 0) == (1.0, 1.0)
    assert bootstrap_ci([False] * 7, 200, 0) == (0.0, 0.0)


def test_bootstrap_ci_brackets_the_mean_and_is_seeded() -> None:
    correct = [True] * 6 + [False] * 14  # accuracy 0.3
    lo, hi = bootstrap_ci(correct, 1000, 0)
    assert 0.0 <= lo < 0.3 < hi <= 1.0
    # the normal approximation gives 0.3 +- 1.96 * sqrt(0.3 * 0.7 / 20) = [0.099, 0.501]
    assert abs(lo - 0.099) < 0.06 and abs(hi - 0.501) < 0.06
    assert bootstrap_ci(correct, 1000, 0) == (lo, hi)
    # interval values are attainable means k/20
    assert math.isclose(lo * 20, round(lo * 20)) and math.isclose(hi * 20, round(hi * 20))


def _pred(correct: bool, parsed: str | None, n_tokens: int) -> Prediction:
    return Prediction("q", "gsm8k", "out", parsed, "5", correct, n_tokens)


def test_summarise_counts_accuracy_tokens_and_unparsed() -> None:
    preds = [_pred(True, "5", 10), _pred(False, None, 30), _pred(False, "4", 20), _pred(True, "5", 40)]
    s = summarise(preds, 100, 0)
    assert s["n"] == 4 and s["accuracy"] == 0.5 and s["mean_tokens"] == 25.0 and s["unparsed"] == 1
    assert summarise([], 100, 0)["accuracy"] == 0.0
    # outputs of exactly the limit were cut by it: 30 and 40 of limit 30 -> 2 of 4
    assert summarise(preds, 100, 0, max_new_tokens=30)["truncated_fraction"] == 0.5
    assert "truncated_fraction" not in s


# ============================================================================== self-consistency vote
def test_self_consistency_majority_vote_and_token_sum(monkeypatch) -> None:
    """k samples per question arrive prompt-major from one call; the vote and token count use all of them."""
    scripted = {
        "q1": ["The answer is 5.", "The answer is 4.", "The answer is 5."],  # majority 5: correct
        "q2": ["The answer is 7.", "The answer is 8.", "The answer is 8."],  # majority 8: wrong
    }
    calls: list[dict] = []

    def fake_generator(prompts, max_new_tokens, temperature, top_p, seed, num_samples=1, top_k=0):
        calls.append({"n": len(prompts), "k": num_samples, "temperature": temperature, "top_k": top_k})
        qids = ["q1" if "Tom" in p else "q2" for p in prompts]
        return [Generation(scripted[q][s], 10 + s) for q in qids for s in range(num_samples)]

    monkeypatch.setattr(ev, "student_prompt", lambda tok, ex, at, prefix="": ex["question"])
    examples = [{"id": "q1", "question": "Tom has 5", "answer": "5"}, {"id": "q2", "question": "Ann has 7", "answer": "7"}]
    preds = evaluate_examples(fake_generator, None, examples, "gsm8k", "number", 8, 16, k=3, temperature=0.7, top_p=0.9,
                              top_k=50)
    assert calls == [{"n": 2, "k": 3, "temperature": 0.7, "top_k": 50}]  # one sampling call for all k samples
    assert [p.parsed for p in preds] == ["5", "8"]
    assert [p.correct for p in preds] == [True, False]
    assert [p.n_tokens for p in preds] == [33, 33]  # 10 + 11 + 12
    assert preds[0].samples == scripted["q1"] and preds[0].output == scripted["q1"][0]


# ============================================================================== per-row sampling
def test_row_sampling_filter_matches_hand_computation() -> None:
    scores = torch.tensor([[2.0, 1.0, 0.0]] * 4)
    # softmax(2,1,0) = (0.665, 0.245, 0.090); ascending cumulative: 0.090, 0.335, 1.0
    temps = torch.tensor([1.0, 1.0, 0.0, 2.0])
    tops = torch.tensor([0.5, 0.8, 1.0, 1.0])
    out = row_sampling_filter(scores, temps, tops)
    inf = float("-inf")
    assert out[0].tolist() == [2.0, inf, inf]  # top_p 0.5: remove cum <= 0.5 -> only the top token
    assert out[1].tolist() == [2.0, 1.0, inf]  # top_p 0.8: remove cum <= 0.2 -> the last token
    assert out[2].tolist() == [2.0, inf, inf]  # temperature 0: greedy, arg-max only
    assert out[3].tolist() == [1.0, 0.5, 0.0]  # temperature 2, no filtering


def test_row_sampling_filter_keeps_at_least_one_token() -> None:
    out = row_sampling_filter(torch.tensor([[0.0, 0.0]]), torch.tensor([1.0]), torch.tensor([0.0]))
    assert torch.isfinite(out).sum() == 1


def test_mixed_batch_greedy_row_equals_plain_greedy(make_lm, tiny_tokenizer) -> None:
    model = make_lm(lora=False).eval()
    prompt = "What is 2 plus 3? Think step by step"
    greedy = generate(model, tiny_tokenizer, [prompt, prompt], 8, 0.0)
    mixed = generate(model, tiny_tokenizer, [prompt, prompt], 8, [0.0, 1.5], [1.0, 1.0], seed=3)
    assert mixed[0] == greedy[0]
    again = generate(model, tiny_tokenizer, [prompt, prompt], 8, [0.0, 1.5], [1.0, 1.0], seed=3)
    assert again == mixed  # seeded


def test_num_samples_are_prompt_major(make_lm, tiny_tokenizer) -> None:
    """Near-zero temperature makes every sample the greedy output of its own prompt."""
    model = make_lm(lora=False).eval()
    prompts = ["What is 2 plus 3?", "Options: (A) bank (B) river"]
    greedy = generate(model, tiny_tokenizer, prompts, 6, 0.0)
    assert greedy[0].text != greedy[1].text
    samples = generate(model, tiny_tokenizer, prompts, 6, 1e-6, 1.0, seed=0, num_samples=3)
    assert [g.text for g in samples] == [greedy[0].text] * 3 + [greedy[1].text] * 3


def test_top_k_one_sampling_is_greedy(make_lm, tiny_tokenizer) -> None:
    """top_k reaches the sampler: with top_k=1 even a hot temperature can only pick the arg-max."""
    model = make_lm(lora=False).eval()
    prompts = ["What is 2 plus 3?", "Options: (A) bank (B) river"]
    greedy = generate(model, tiny_tokenizer, prompts, 8, 0.0)
    hot = generate(model, tiny_tokenizer, prompts, 8, 5.0, 1.0, seed=1, top_k=1)
    assert hot == greedy
    assert generate(model, tiny_tokenizer, prompts, 8, 5.0, 1.0, seed=1) != greedy  # without it: not greedy


def test_decoding_settings_per_profile() -> None:
    """CPU default: greedy single answers; paper profile: the official test script's sampling, SC k=10."""
    from magdi.config import load_params
    from magdi.pipeline import decoding

    root = Path(__file__).resolve().parents[1]
    cpu = load_params(root / "params.yaml", check_mirror=False)
    assert decoding(cpu, 1) == {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0}
    paper = load_params(root / "params.paper.yaml", check_mirror=False)
    assert decoding(paper, 1) == {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "seed": 0}
    assert paper.evaluate.self_consistency.k == 10
    assert decoding(paper, 10) == {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "seed": 0}
    assert paper.train.gcn_dropout == 0.5


def test_generate_rejects_inconsistent_sampling_arguments(make_lm, tiny_tokenizer) -> None:
    model = make_lm(lora=False).eval()
    with pytest.raises(ValueError, match="temperature > 0"):
        generate(model, tiny_tokenizer, ["hi"], 2, 0.0, num_samples=2)
    with pytest.raises(ValueError, match="one value per prompt"):
        generate(model, tiny_tokenizer, ["hi", "yo"], 2, [0.5], [1.0, 1.0])


def test_generate_keeps_model_generate_when_greedy_is_altered(make_lm, tiny_tokenizer, monkeypatch) -> None:
    """A repetition penalty (or any processor) in the model's generation_config keeps model.generate."""
    import magdi.student as st

    model = make_lm(lora=False).eval()
    assert st.plain_greedy(model)
    model.generation_config.repetition_penalty = 1.3
    assert not st.plain_greedy(model)
    import magdi.decoding as dec

    monkeypatch.setattr(dec, "greedy_decode", lambda *a, **k: pytest.fail("must not be used"))
    model.generation_config.eos_token_id = tiny_tokenizer.eos_token_id
    assert len(generate(model, tiny_tokenizer, ["hi"], 3)) == 1


# ============================================================================== vLLM backend (optional)
def test_vllm_generator_contract(monkeypatch, tiny_tokenizer, tmp_path) -> None:
    """vLLM is not installable here (CUDA); a stand-in module records what our code asks of its API:
    LoRA served directly, our own token ids (no second BOS), n samples per prompt, prompt-major results."""
    import sys
    import types

    seen: dict = {}

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LoRARequest:
        def __init__(self, name, int_id, path):
            self.args = (name, int_id, path)

    class LLM:
        def __init__(self, **kw):
            seen["engine"] = kw

        def generate(self, prompts, params, lora_request=None, use_tqdm=True):
            seen.update(prompts=prompts, params=params.kw, lora=lora_request.args if lora_request else None)
            n = params.kw["n"]
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f" p{i}s{s} ", token_ids=[1] * (i + s + 1))
                                                   for s in range(n)]) for i in range(len(prompts))]

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    lora_mod = types.ModuleType("vllm.lora.request")
    lora_mod.LoRARequest = LoRARequest
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora_mod)
    from magdi.backends_vllm import VLLMGenerator

    gen = VLLMGenerator("models/student", tiny_tokenizer, tmp_path / "adapter", "bfloat16", 16, 0,
                        {"gpu_memory_utilization": 0.8})
    assert seen["engine"]["enable_lora"] is True and seen["engine"]["max_lora_rank"] == 16
    assert seen["engine"]["gpu_memory_utilization"] == 0.8 and seen["engine"]["trust_remote_code"] is False
    out = gen(["What is 2 plus 3?", "Options: (A) bank"], 12, 0.7, 0.9, 5, num_samples=2)
    assert [g.text for g in out] == ["p0s0", "p0s1", "p1s0", "p1s1"]
    assert [g.n_tokens for g in out] == [1, 2, 2, 3]
    assert seen["params"] == {"n": 2, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_tokens": 12, "seed": 5}
    assert seen["prompts"][0]["prompt_token_ids"] == tiny_tokenizer("What is 2 plus 3?", add_special_tokens=False)["input_ids"]
    assert seen["lora"] == ("magdi", 1, str(tmp_path / "adapter"))
    gen(["hi"], 4, 0.7, 0.9, 5, top_k=50)
    assert seen["params"]["top_k"] == 50
    gen(["hi"], 4)  # greedy: temperature 0, no seed, top_p 1
    assert seen["params"] == {"n": 1, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_tokens": 4, "seed": None}
    base = VLLMGenerator("models/student", tiny_tokenizer, None)  # zero-shot: no LoRA
    assert "enable_lora" not in seen["engine"]
    base(["hi"], 4)
    assert seen["lora"] is None


def test_truncation_stats_counts_what_the_limits_cut() -> None:
    """Hand count with a whitespace 'tokenizer': targets get one EOS on top, prompts are counted as they are."""
    from magdi.train import TrainItem, truncation_stats

    class Tok:  # whitespace "tokenizer" with an EOS id, as the encoders see it
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    tok = Tok()

    items = [TrainItem("p one two", ["a b", "a b c"], [1, 0]), TrainItem("p", ["a b c d", "a b"], [1, 1])]
    # unique targets: "a b" (2+1), "a b c" (3+1), "a b c d" (4+1) against 4 -> 1 of 3 cut; prompts 3 and 1 vs 2
    assert truncation_stats(items, tok, 2, 4) == {"prompts_truncated_fraction": 0.5,
                                                  "targets_truncated_fraction": 1 / 3}


def _head_bmms(model, tokenizer, prompts: list[str]) -> list[list]:
    """Shapes of the batched matmuls that expand the LM head (a [batch, hidden, vocab] operand)."""
    from torch.profiler import ProfilerActivity, profile

    head = model.get_output_embeddings().weight
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        generate(model, tokenizer, prompts, 2, 0.0, 1.0, 0)
    return [e.input_shapes for e in prof.events() if e.name == "aten::bmm"
            and any(list(s) == [len(prompts), head.shape[1], head.shape[0]] for s in e.input_shapes)]


def test_frozen_merged_model_decodes_without_copying_the_lm_head(make_lm, tiny_tokenizer) -> None:
    """A merged adapter leaves every weight frozen; torch.matmul then refuses to fold the strided last-position
    slice of the first decoding step and expands the LM head to batch x hidden x vocab (a bmm). The hook of
    ready_for_generation hands the head a contiguous input, so the head stays one mm and the outputs do not
    change."""
    from magdi.student import ready_for_generation

    prompts = ["two plus two is", "a much longer prompt about three apples and four pears is"]
    lm = make_lm(lora=True).merge_and_unload().eval()  # what the evaluator gets from a trained adapter
    assert not any(q.requires_grad for q in lm.parameters())
    before = generate(lm, tiny_tokenizer, prompts, 6, 0.0, 1.0, 0)
    if not _head_bmms(lm, tiny_tokenizer, prompts):
        pytest.skip("this torch folds frozen strided inputs itself (pytorch#118548 fixed): nothing to avoid")
    lm, tok = ready_for_generation(lm, tiny_tokenizer)
    ready_for_generation(lm, tok)  # idempotent: one hook
    assert len(lm.get_output_embeddings()._forward_pre_hooks) == 1
    assert _head_bmms(lm, tok, prompts) == []
    assert [g.text for g in generate(lm, tok, prompts, 6, 0.0, 1.0, 0)] == [g.text for g in before]
