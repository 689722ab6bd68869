"""Student generation through vLLM (optional, for users with a GPU): same contract as ``student.generate``.

vLLM serves the trained LoRA adapter directly (``LoRARequest``), so nothing is merged or copied, and
its continuous batching + paged KV cache make evaluation of a 7B student several times faster than
``transformers.generate``. Prompts are passed as token ids made by *our* tokenizer call
(``add_special_tokens=False``): the chat template already contains the BOS token, and letting vLLM
tokenize the text would add a second one, so both backends see exactly the same tokens.
Install with ``pip install vllm`` (CUDA); it is never imported unless ``evaluate.backend: vllm``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .student import Generation


class VLLMGenerator:
    """Callable ``(prompts, max_new_tokens, temperature, top_p, seed, num_samples, top_k) -> [Generation]``."""

    def __init__(
        self,
        model_path: str | Path,
        tokenizer,
        adapter_dir: str | Path | None = None,
        dtype: str = "bfloat16",
        max_lora_rank: int = 16,
        seed: int = 0,
        engine_kwargs: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        try:
            from vllm import LLM
            from vllm.lora.request import LoRARequest
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise ImportError("evaluate.backend: vllm needs the vllm package (pip install vllm; CUDA GPU)") from e
        kwargs: dict[str, Any] = {"model": str(model_path), "tokenizer": str(model_path), "dtype": dtype,
                                  "seed": seed, "trust_remote_code": trust_remote_code}
        if adapter_dir is not None:
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank)
        kwargs.update(engine_kwargs or {})
        self.llm = LLM(**kwargs)
        self.tokenizer = tokenizer
        self.lora = LoRARequest("magdi", 1, str(adapter_dir)) if adapter_dir is not None else None

    def __call__(
        self,
        prompts: list[str],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        num_samples: int = 1,
        top_k: int = 0,
    ) -> list[Generation]:
        from vllm import SamplingParams

        if num_samples > 1 and temperature <= 0:
            raise ValueError("num_samples > 1 needs temperature > 0 (greedy samples would all be identical)")
        sample = temperature > 0
        params = SamplingParams(n=num_samples, temperature=temperature if sample else 0.0,
                                top_p=top_p if sample else 1.0, top_k=top_k if sample and top_k > 0 else -1,
                                max_tokens=max_new_tokens,
                                seed=seed if sample else None)
        token_prompts = [{"prompt_token_ids": self.tokenizer(p, add_special_tokens=False)["input_ids"]}
                         for p in prompts]
        outputs = self.llm.generate(token_prompts, params, lora_request=self.lora, use_tqdm=False)
        # one RequestOutput per prompt, in prompt order, each with n completions: prompt-major like HF
        return [Generation(text=c.text.strip(), n_tokens=len(c.token_ids)) for o in outputs for c in o.outputs]
