"""Shared fixtures: a tiny random Llama student and a tiny tokenizer, both built in-process.

Nothing here touches a model hub or the packaged SmolLM2 weights, so the tests run on a bare CI
machine. The tokenizer is a byte-level BPE trained on a handful of sentences (any text encodes), with
``<eos>``/``<pad>`` tokens and a ChatML-like ``chat_template``; the model is a 2-layer Llama with hidden
size 32, built from a config under a fixed seed, so two builds are bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "What is 2 plus 3? Think step by step, then finish with 'The answer is N.' where N is a number.",
    "The answer is 5. The answer is yes. The answer is no. The correct option is (B).",
    '{"reasoning": "Add the numbers step by step.", "answer": "5", "confidence": 0.9}',
    "Answers of all agents in the previous round: answer 6 (confidence 0.70). Reasoning: first add.",
    "Review these answers and their reasoning critically, then give your updated answer.",
    "Options: (A) bank (B) river (C) shop. Tom has 3 apples and buys 2 more apples.",
]

LORA_TARGETS = ["q_proj", "v_proj"]

from magdi.precision import Capabilities  # noqa: E402

#: an x86-64 CPU with AVX2 and no native bf16 (e.g. AMD Zen 3): what the unit tests resolve ``auto`` against
AVX2_ONLY = Capabilities("x86_64", frozenset({"avx", "avx2", "fma"}), "fake Zen 3")

# The test models are tiny: intra-op thread fan-out only adds overhead, and on a loaded machine spinning
# OpenMP workers make a 3-step training run ~30x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fp32_machine():
    """Unit tests resolve ``auto`` precision as on a CPU without native bf16 (AVX2 only): fp32 everywhere, the
    same numerics on every machine CI may land on. tests/test_precision.py fakes every other class explicitly.
    Its own MonkeyPatch, so a test's ``monkeypatch.undo()`` keeps it. (Subprocesses do not see it: their configs
    say ``bf16=False``.)"""
    from magdi import precision

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(precision, "capabilities", lambda: AVX2_ONLY)
        yield


#: the settings params.yaml must give (config.py holds no default for them), empty: what a minimal test config adds
REQUIRED_EMPTY = {"models": {}, "data": {"n_train_by_task": {}}, "student": {"model": "student"},
                  "teachers": {"earlier_limits": [], "max_rounds_by_task": {}},
                  "evaluate": {"max_new_tokens_by_task": {}},
                  "experiments": {"ablations": {}, "ablation_tasks": [], "ood_tasks": [], "self_consistency_methods": [],
                                  "self_consistency_tasks": [], "data_scaling": [], "multitask_methods": [],
                                  "scaling_students": [], "scaling_tasks": [], "scaling_train": {}, "task_train": {}}}


def minimal(raw: dict) -> dict:
    """``raw`` with the required settings it lacks filled in empty (:data:`REQUIRED_EMPTY`), for tests that build a
    small params mapping by hand instead of reading params.yaml."""
    out = {k: dict(v) for k, v in REQUIRED_EMPTY.items()}
    for k, v in raw.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and k in out else v
    return out


def load_script(relpath: str, name: str):
    """A repository script outside the package (benchmarks/, tools/) imported as a module, to test its functions.

    Registered in ``sys.modules`` before it runs, as an import would (dataclasses look their module up there)."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / relpath)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_lm(tokenizer, seed: int = 0, lora: bool = True, head_dim: int | None = None):
    """A tiny random LlamaForCausalLM (optionally LoRA-wrapped); identical for identical seeds. Its heads are
    8 wide unless ``head_dim`` says otherwise (FlexAttention on CUDA needs at least 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from magdi.student import attach_lora

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=head_dim,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
        model = LlamaForCausalLM(cfg)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        if lora:
            model = attach_lora(model, r=4, alpha=8, dropout=0.0, target_modules=LORA_TARGETS)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def make_lm(tiny_tokenizer) -> Callable[..., torch.nn.Module]:
    """Factory: ``make_lm(seed=0, lora=True)`` builds a fresh tiny student (training mutates it)."""

    def _make(seed: int = 0, lora: bool = True, head_dim: int | None = None):
        return build_lm(tiny_tokenizer, seed=seed, lora=lora, head_dim=head_dim)

    return _make


@pytest.fixture
def tiny_lm(make_lm):
    return make_lm()
