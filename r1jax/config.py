"""Typed, frozen run configuration loaded from YAML with dotted `key=value` overrides.

    cfg = r1jax.config.load("configs/model/tiny-moe.yaml", "model.hidden_size=64")

Model fields carry the names of the HF `config.json` of DeepSeek-V3 / Qwen2 / Llama, so an HF
config maps field for field (`ModelConfig.from_hf`). Every error names the offending key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config value is unknown, missing or impossible; `key` is its dotted path."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """`rope_scaling` of an HF config: YaRN (DeepSeek) or Llama-3 frequency scaling."""

    type: Literal["yarn", "llama3"] = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self):
        _require(self.factor >= 1.0, "factor", f"must be >= 1, got {self.factor}")
        _require(self.beta_fast > self.beta_slow > 0, "beta_fast", "need beta_fast > beta_slow > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """One decoder: DeepSeek MLA + MoE (+MTP) or a dense GQA student (Qwen2 / Llama).

    A layer never asks which model it is in: `kv_lora_rank` set means MLA attention, unset means
    GQA; `n_routed_experts > 0` means MoE FFNs after the first `first_k_dense_replace` layers.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    num_key_value_heads: int | None = None
    # Multi-head Latent Attention (DeepSeek). kv_lora_rank None -> GQA (dense students).
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # GQA attention (dense students).
    head_dim: int | None = None
    attention_bias: bool = False  # bias on q, k, v and o (Llama's flag)
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
    # DeepSeekMoE.
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    n_shared_experts: int = 0
    first_k_dense_replace: int = 0
    n_group: int = 1
    topk_group: int = 1
    scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"
    topk_method: Literal["noaux_tc", "greedy", "group_limited_greedy"] = "noaux_tc"
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (V3: 1e-4)
    bias_update_speed: float = 0.001  # gamma of the aux-loss-free bias update
    # Storage of the routed experts. "param": `param_dtype` Params. "float8_e4m3fn": for sampling
    # only, DeepSeek-V3/R1's released format: fp8 weights with a float32 scale_inv per block
    # (`r1jax.model.fp8`), held outside the Params and dequantized one layer at a time inside
    # the compiled step. fp8_block_size: the block over HF's [out, in] weight
    # (`quantization_config.weight_block_size`).
    expert_dtype: Literal["param", "float8_e4m3fn"] = "param"
    fp8_block_size: tuple[int, ...] = (128, 128)
    # Multi-Token Prediction depth.
    num_nextn_predict_layers: int = 0
    # Positions.
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_interleave: bool = True  # DeepSeek weights rotate pairs (2i, 2i+1); Llama/Qwen halves
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    hidden_act: Literal["silu"] = "silu"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Numerics and compilation.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "full", "save_dots"] = "none"
    # Layers per iteration of the layer scan (`lax.scan(unroll=)`); >= the stack's depth compiles
    # straight-line code (no while loop, no stacked residual buffers) at the price of compile time
    # growing with depth. Keep 1 for deep models. The sampling engine's layer scans use it too:
    # on XLA:CPU a tiny model decodes faster at batch 1 straight-line.
    scan_unroll: int = 1
    # Training/prefill attention kernel (`r1jax.model.attention_kernels`). "auto": Pallas splash
    # attention on TPU, cuDNN flash attention (`jax.nn.dot_product_attention`) on GPU, the
    # block-causal XLA path elsewhere.
    attention_impl: Literal["auto", "xla", "splash", "cudnn"] = "auto"

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def num_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_hidden_layers) if self.is_moe else self.num_hidden_layers

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def gqa_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            _require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        _require(self.scan_unroll >= 1, "scan_unroll", f"must be >= 1, got {self.scan_unroll}")
        _require(self.num_attention_heads % self.kv_heads == 0, "num_attention_heads",
                 f"{self.num_attention_heads} heads are not divisible by num_key_value_heads={self.kv_heads}")
        if self.is_mla:
            _require(self.kv_heads == self.num_attention_heads, "num_key_value_heads",
                     "MLA needs num_key_value_heads == num_attention_heads")
            _require(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even")
            _require(not self.attention_bias and not self.qkv_bias, "attention_bias", "MLA has no biases")
        else:
            _require(self.gqa_head_dim % 2 == 0, "head_dim", "must be even for RoPE")
        if self.is_moe:
            _require(0 < self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                     f"must be in 1..n_routed_experts={self.n_routed_experts}")
            _require(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive for MoE")
            _require(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group",
                     f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
            _require(1 <= self.topk_group <= self.n_group, "topk_group",
                     f"topk_group={self.topk_group} must be in 1..n_group={self.n_group}")
            per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1:
                _require(per_group >= 2, "n_group", "group scores use the top-2 experts: need >= 2 experts a group")
                _require(self.topk_group * per_group >= self.num_experts_per_tok, "topk_group",
                         "the kept groups hold fewer experts than num_experts_per_tok")
            _require(self.topk_method != "noaux_tc" or self.scoring_func == "sigmoid", "topk_method",
                     "noaux_tc routing needs scoring_func: sigmoid")
        _require(self.expert_dtype == "param" or self.is_moe, "expert_dtype",
                 "fp8 experts need routed experts (n_routed_experts > 0)")
        _require(len(self.fp8_block_size) == 2 and min(self.fp8_block_size) > 0, "fp8_block_size",
                 f"must be two positive sizes [out, in], got {list(self.fp8_block_size)}")
        _require(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
        """Builds from an HF `config.json` mapping; keys r1jax does not model are ignored."""
        # HF's `dtype` is the storage dtype of the weights, not r1jax's compute dtype.
        known = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype"}
        data = {k: v for k, v in hf.items() if k in known}
        rope = hf.get("rope_scaling") or hf.get("rope_parameters")
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in ("yarn", "llama3"):
            rope = {("type" if k == "rope_type" else k): v for k, v in rope.items()}
            rope_known = {f.name for f in dataclasses.fields(RopeScaling)}
            data["rope_scaling"] = {k: v for k, v in rope.items() if k in rope_known}
        else:
            data["rope_scaling"] = None
        if isinstance(rope, dict) and "rope_theta" in rope:
            data["rope_theta"] = rope["rope_theta"]
        data.update(overrides)
        return build(cls, data)


# HF `model_type` -> (fields its config.json may leave out, fields its architecture fixes).
HF_MODEL_TYPES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "deepseek_v3": ({}, {}),
    # V2 / V2-Lite: softmax scores, no correction bias; rope pairs interleaved (complex rotation)
    "deepseek_v2": ({"topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False},
                    {"scoring_func": "softmax", "rope_interleave": True}),
    "qwen2": ({}, {"qkv_bias": True, "rope_interleave": False}),  # Qwen2 always has q/k/v bias, o without
    "llama": ({}, {"rope_interleave": False}),
}
HF_ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")


def model_config_from_hf(hf: dict[str, Any], **overrides) -> ModelConfig:
    """An HF config mapping (`config.json`, or transformers' `config.to_dict()`) -> `ModelConfig`,
    float32 compute and parameters unless overridden. Errors name the unsupported key."""
    model_type = hf.get("model_type")
    _require(model_type in HF_MODEL_TYPES, "model_type",
             f"{model_type!r} is not supported (known: {', '.join(HF_MODEL_TYPES)})")
    archs = [a for a in hf.get("architectures") or [] if a not in HF_ARCHITECTURES]
    _require(not archs, "architectures", f"{archs[0] if archs else ''} is not supported "
                                         f"(known: {', '.join(HF_ARCHITECTURES)})")
    _require(not hf.get("mlp_bias"), "mlp_bias", "biased MLPs are not supported")
    _require(not hf.get("use_sliding_window"), "use_sliding_window", "sliding-window attention is not supported")
    _require(not (model_type.startswith("deepseek") and hf.get("attention_bias")), "attention_bias",
             "MLA with biases is not supported")
    defaults, fixed = HF_MODEL_TYPES[model_type]
    data = {**defaults, **{k: v for k, v in hf.items() if k != "dtype"}, **fixed}  # HF's dtype is storage
    return ModelConfig.from_hf(data, **{"dtype": "float32", "param_dtype": "float32", **overrides})


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh: named axes data / expert / model; one of them may be -1 ("the rest")."""

    data: int = -1
    expert: int = 1
    model: int = 1
    fsdp: bool = False  # shard parameters and optimizer state over `data` as well
    dcn_data: int = 1  # multi-slice: slices along `data` (hybrid ICI x DCN mesh)

    def __post_init__(self):
        sizes = {"data": self.data, "expert": self.expert, "model": self.model}
        for k, v in sizes.items():
            _require(v == -1 or v >= 1, k, f"must be >= 1 or -1, got {v}")
        _require(list(sizes.values()).count(-1) <= 1, "data", "at most one mesh axis may be -1")
        _require(self.dcn_data >= 1, "dcn_data", "must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with warm-up then cosine decay and global-norm clipping (V3: beta 0.9/0.95, wd 0.1)."""

    learning_rate: float = 3e-4
    warmup_steps: int = 0
    decay_steps: int = 0  # cosine length after warm-up; 0: constant after warm-up
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    # Storage of AdamW's first and second moments. bfloat16 halves the optimizer state; the
    # master weights' dtype is `model.param_dtype` (bfloat16 there: bf16 master weights).
    moment_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self):
        _require(self.learning_rate > 0, "learning_rate", "must be positive")
        _require(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "b1", "betas must be in [0, 1)")
        _require(self.warmup_steps >= 0 and self.decay_steps >= 0, "warmup_steps", "must be >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    mtp_weight: float = 0.3  # lambda of the MTP loss (V3: 0.3 early, 0.1 later)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How the step runs on the mesh (not which mesh: that is `mesh`)."""

    expert_dispatch: Literal["dropless", "capacity"] = "dropless"
    capacity_factor: float = 1.25  # capacity dispatch: slots per expert relative to an even split
    # Grouped matmul of the routed experts. "auto": megablox on TPU, `ragged_dot` on GPU, the
    # blocked CPU path on CPU.
    expert_kernel: Literal["auto", "ragged_dot", "megablox"] = "auto"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """Multi-host start; all null: read the usual environment (or single process)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every: int = 100  # steps between saves (0: only at the end)
    keep: int = 3  # most recent checkpoints kept
    async_save: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where tokens come from. `builtin` generates the verifiable tasks of `r1jax.data.tasks`."""

    source: str = "builtin"  # builtin | a .jsonl / .array_record path (or a glob)
    eval_source: str | None = None  # held-out data; builtin: the tasks' eval split
    format: Literal["text", "chat", "gsm8k"] = "text"  # what each JSONL record holds
    tokenizer: str | None = None  # a SentencePiece .model; null: trained into run_dir
    vocab_size: int = 1024  # of a tokenizer trained here
    builtin_docs: int = 20000  # built-in corpus size (pretrain documents / SFT samples)
    max_difficulty: int = 3  # built-in tasks of difficulty 1..max_difficulty
    tasks: tuple[str, ...] = ("arithmetic", "countdown", "linear")  # which built-in tasks
    skip_bad_lines: bool = False  # malformed JSONL records: skipped and counted, not fatal
    tagged_docs: float = 0.0  # share of built-in pretraining documents in <think>/<answer> form (R1-Zero's base)

    def __post_init__(self):
        known = ("arithmetic", "countdown", "linear")
        _require(len(self.tasks) > 0 and all(t in known for t in self.tasks), "tasks",
                 f"must be a non-empty list of {list(known)}, got {list(self.tasks)}")
        _require(self.max_difficulty >= 1, "max_difficulty", "must be >= 1")
        _require(0.0 <= self.tagged_docs <= 1.0, "tagged_docs", f"must be in [0, 1], got {self.tagged_docs}")
    packing: Literal["concat_split", "first_fit"] | None = None  # null: by mode
    shuffle: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class GrpoConfig:
    """GRPO (DeepSeekMath) and its variants; option names follow TRL's GRPOConfig."""

    num_generations: int = 8  # G completions per prompt
    prompts_per_step: int = 8  # prompts of one rollout batch
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    loss_type: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0  # KL weight (k3); 0 compiles no reference forward and keeps no reference
    ref_reset_every: int = 0  # steps between copying the policy into the reference (R1: 400)
    mu: int = 1  # optimisation passes over each rollout batch
    num_minibatches: int = 1  # optimizer steps per pass
    mask_truncated_completions: bool = False
    overlong_buffer: int = 0  # DAPO soft overlong punishment over the last N tokens (0: off)
    dynamic_sampling: bool = False  # DAPO: drop groups with equal rewards and refill the batch
    max_sampling_rounds: int = 4
    oversample: float = 2.0  # dynamic sampling draws this many prompts per one still missing
    # A round whose groups all scored alike ends the redraws: from a weak policy more rounds
    # would spend minutes on the same all-wrong groups. This many iterations in a row without
    # one informative group stop the run with NoSignalError (0: never stop).
    max_iterations_without_signal: int = 5
    rewards: dict = dataclasses.field(default_factory=lambda: {"accuracy": 1.0, "format": 0.2})
    reward_timeout_s: float = 10.0  # one deadline for all reward calls of a batch
    # Rewards in worker processes (`train.reward_sandbox`): killed at the deadline, address space
    # capped at reward_memory_mb, a crash contained. false: threads of the trainer (debugging only:
    # a hang is abandoned, not killed, and a crash or runaway allocation takes the run down).
    reward_sandbox: bool = True
    reward_workers: int = 2
    reward_memory_mb: int = 2048
    # None: prompts in the tokenizer's chat template. A string with {question}: raw text after
    # bos, as R1-Zero prompts its base model (corpus.R1_ZERO_PROMPT; the paper's longer one in
    # configs/grpo-r1-zero.yaml).
    prompt_template: str | None = None
    eval_every: int = 0
    eval_prompts: int = 64  # held-out prompts evaluated (0: no evaluation)
    eval_samples: int = 4  # k for pass@1 at T 0.6, top-p 0.95
    log_samples_every: int = 10

    def __post_init__(self):
        _require(self.num_generations >= 2, "num_generations", "a group needs at least 2 completions")
        _require(self.mu >= 1 and self.num_minibatches >= 1, "mu", "must be >= 1")
        _require((self.prompts_per_step * self.num_generations) % self.num_minibatches == 0, "num_minibatches",
                 "must divide prompts_per_step * num_generations")
        _require(self.beta >= 0, "beta", "must be >= 0")
        _require(self.oversample >= 1, "oversample", "must be >= 1")
        _require(self.max_sampling_rounds >= 1, "max_sampling_rounds", "must be >= 1")
        _require(self.max_iterations_without_signal >= 0, "max_iterations_without_signal", "must be >= 0")
        _require(self.prompt_template is None or "{question}" in self.prompt_template, "prompt_template",
                 "must contain {question}")
        _require(0 <= self.epsilon_low < 1 and self.epsilon_high >= 0, "epsilon_low", "clip range out of bounds")
        _require(self.reward_timeout_s > 0, "reward_timeout_s", f"must be > 0, got {self.reward_timeout_s}")
        _require(self.reward_workers >= 1, "reward_workers", f"must be >= 1, got {self.reward_workers}")
        # Python with math-verify imported already maps ~200 MB.
        _require(self.reward_memory_mb >= 256, "reward_memory_mb", f"must be >= 256, got {self.reward_memory_mb}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """R1's distillation (`r1jax.train.distill`): a teacher's verified traces -> a student (`model`).

    sequence: SFT of the student on the traces. logit: the student matches the teacher's token
    distributions over the traces (stored top-k, or the live teacher's full vocabulary)."""

    teacher: str | None = None  # a run dir, params export or HF directory (its saved config is the teacher's)
    kind: Literal["sequence", "logit"] = "sequence"
    samples: int = 4  # completions per prompt (k)
    prompts: int = 256  # built-in train-split prompts
    eval_prompts: int = 0  # built-in eval-split prompts whose traces are held out (the held-out loss)
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 128  # completion tokens; a completion cut off here is dropped (unless keep_truncated)
    keep_truncated: bool = False
    min: dict = dataclasses.field(default_factory=lambda: {"accuracy": 1.0, "format": 1.0})  # reward thresholds
    batch_prompts: int = 64  # prompts per sampling batch
    sample_seed: int = 0
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"  # logit-level divergence
    jsd_beta: float = 0.5  # JSD_beta's mixture weight of the teacher (0: forward KL, 1: reverse KL)
    kd_temperature: float = 1.0  # softmax temperature of student and teacher logits
    top_k: int = 20  # teacher token ids stored per position (stored top-k)
    live_teacher: bool = False  # the teacher's forward inside the student step (full vocabulary)
    ce_weight: float = 0.0  # + ce_weight x next-token CE on the trace tokens (logit-level)

    def __post_init__(self):
        for key in ("samples", "prompts", "max_tokens", "batch_prompts", "top_k"):
            _require(getattr(self, key) >= 1, key, "must be >= 1")
        _require(self.eval_prompts >= 0, "eval_prompts", "must be >= 0")
        _require(self.temperature >= 0 and 0 < self.top_p <= 1, "temperature", "temperature >= 0, 0 < top_p <= 1")
        _require(0.0 <= self.jsd_beta <= 1.0, "jsd_beta", f"must be in [0, 1], got {self.jsd_beta}")
        _require(self.kd_temperature > 0, "kd_temperature", "must be > 0")
        _require(self.ce_weight >= 0, "ce_weight", "must be >= 0")
        _require(bool(self.min) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                        for v in self.min.values()),
                 "min", f"must map reward names to numbers, got {self.min!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """A run: the model, the mesh it runs on, and the training recipe."""

    model: ModelConfig
    mode: Literal["pretrain", "sft", "grpo", "distill"] = "pretrain"
    run_dir: str = "runs/default"  # checkpoints, metrics, plots
    steps: int = 100
    seed: int = 0
    resume: Literal["auto", "never"] = "auto"
    init_from: str | None = None  # a run_dir or exported params to start from (SFT after pretraining)
    metrics_jsonl: str | None = None  # default: run_dir/metrics.jsonl
    log_every: int = 1
    max_nonfinite_steps: int = 3  # this many NaN/inf losses in a row stop the run
    eval_every: int = 0  # steps between held-out losses (0: only at the end)
    eval_batches: int = 4
    batch_size: int = 8  # global sequences per optimizer step
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size is split among them)
    seq_len: int = 128
    mesh: MeshConfig = MeshConfig()
    parallel: ParallelConfig = ParallelConfig()
    distributed: DistributedConfig = DistributedConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    data: DataConfig = DataConfig()
    grpo: GrpoConfig = GrpoConfig()
    distill: DistillConfig = DistillConfig()

    def __post_init__(self):
        m = self.model
        _require(self.steps >= 0, "steps", "must be >= 0")
        _require(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        _require(self.batch_size % self.grad_accum == 0, "grad_accum",
                 f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}")
        _require(self.seq_len >= 2, "seq_len", "must be >= 2")
        check_fits(m, model=self.mesh.model, expert=self.mesh.expert)  # sizes known before the mesh exists
        _require(self.mode != "distill" or bool(self.distill.teacher), "distill.teacher",
                 "mode: distill needs a teacher (a run dir, params export or HF directory)")


def check_fits(cfg: ModelConfig, *, model: int, expert: int, data: int | None = None,
               batch_size: int | None = None) -> None:
    """The one check that a model splits over a mesh: attention heads over `mesh.model`, routed
    experts over `mesh.expert`, and (with `data` and `batch_size`) the batch over data*expert.
    Sizes below 2 (1, or -1 before the mesh resolves it) are not checked. ConfigError naming the key.
    `Config` checks its configured sizes; `parallel.mesh.check_model_fits` the built mesh's."""
    if model > 1:
        heads = cfg.kv_heads if not cfg.is_mla else cfg.num_attention_heads
        _require(heads % model == 0, "mesh.model", f"{heads} attention heads are not divisible by mesh.model={model}")
    if expert > 1 and cfg.is_moe:
        _require(cfg.n_routed_experts % expert == 0, "mesh.expert",
                 f"n_routed_experts={cfg.n_routed_experts} is not divisible by mesh.expert={expert}")
    if batch_size is not None and data is not None:
        shards = data * max(expert, 1)
        _require(batch_size % shards == 0, "batch_size", f"{batch_size} sequences do not split over data*expert={shards}")


# ----------------------------------------------------------------------------- loading


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            _require(type(None) in args, key, "may not be null")
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        _require(value in choices, key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        _require(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return build(tp, value, prefix=key)
    if tp is bool:
        _require(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _require(ok and math.isfinite(value), key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _require(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    if tp is dict:
        _require(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:  # tuple[X, ...]: a YAML list, or one comma-separated string
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        _require(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        (item, _) = typing.get_args(tp)
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    return value


def build(cls, data: dict[str, Any], prefix: str = ""):
    """Builds dataclass `cls` from a mapping, checking keys and types; errors name the key."""
    dotted = lambda name: f"{prefix}.{name}" if prefix else name  # noqa: E731
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            raise ConfigError(dotted(name), f"unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], dotted(name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(dotted(name), "required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(dotted(e.key), str(e).split(": ", 1)[-1]) from None


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError("", f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: top level must be a mapping")
    return data


def _hf_config_file(ref: str | None, base: Path) -> Path | None:
    """An HF `config.json` that `ref` names (the file, or a model directory holding one)."""
    for candidate in (Path(ref), base / ref) if ref else ():
        if candidate.is_dir():
            candidate = candidate / "config.json"
        if candidate.is_file() and candidate.suffix == ".json":
            return candidate
    return None


def _read_model(ref: str, base: Path) -> dict:
    """A model mapping: an r1jax model YAML, or an HF `config.json` / model directory."""
    hf = _hf_config_file(ref, base)
    if hf is None:
        return _read_yaml(_resolve_model_path(ref, base))
    try:
        return dataclasses.asdict(model_config_from_hf(json.loads(hf.read_text())))
    except json.JSONDecodeError as e:
        raise ConfigError("model", f"{hf}: not JSON ({e})") from None


def _resolve_model_path(ref: str, base: Path) -> Path:
    for candidate in (Path(ref), base / ref, CONFIGS_DIR / "model" / ref, CONFIGS_DIR / "model" / f"{ref}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError("model", f"model config {ref!r} not found (looked in ., {base}, {CONFIGS_DIR / 'model'})")


def _set_dotted(data: dict, dotted_key: str, value: Any) -> None:
    keys = dotted_key.split(".")
    node = data
    for i, k in enumerate(keys[:-1]):
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(keys[: i + 1]), f"is not a mapping, cannot set {dotted_key}")
        node = child
    node[keys[-1]] = value


def load_dict(path: str | Path | None, *overrides: str) -> dict:
    """The raw mapping of a run config after model-path resolution and overrides."""
    data: dict = {}
    base = Path(".")
    if path is not None:
        path = Path(path)
        base = path.parent
        data = _read_yaml(path)
        if "hidden_size" in data:  # a bare model file, as under configs/model/
            data = {"model": data}
    if isinstance(data.get("model"), str):
        data["model"] = _read_model(data["model"], base)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override must look like key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        value = yaml.safe_load(raw) if raw.strip() else None
        if key == "model" and isinstance(value, str):
            value = _read_model(value, base)
        _set_dotted(data, key, value)
    model = data.get("model")
    if (model is None or (isinstance(model, dict) and "hidden_size" not in model)) and isinstance(
            data.get("init_from"), str) and _hf_config_file(data["init_from"], base):
        data["model"] = {**_read_model(data["init_from"], base), **(model or {})}  # the HF model's, overridden
    return data


def load(path: str | Path | None, *overrides: str, cls=Config):
    """Loads a run config (or a bare model file) with `a.b=value` overrides, validated."""
    return build(cls, load_dict(path, *overrides))


def load_model(path: str | Path, *overrides: str) -> ModelConfig:
    """Loads just the model part; overrides may be written with or without `model.`. A run file's
    other keys are not checked, so a model only sampling can use (fp8 experts) loads too."""
    fixed = [o if o.startswith("model.") else f"model.{o}" for o in overrides]
    data = load_dict(path, *fixed)
    _require("model" in data, "model", "required key is missing")
    return _coerce(ModelConfig, data["model"], "model")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def merge(base: dict, over: dict) -> dict:
    """`base` with `over`'s entries, nested mappings merged key by key (a saved run config plus
    command-line overrides)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ----------------------------------------------------------------------------- command lines


def parse_bool(text: str) -> bool:
    """true/false (also 1/0, yes/no, on/off), any case; ValueError otherwise."""
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_value(key: str, text: str, kind: Callable[[str], Any]) -> Any:
    """`text` as `kind`: str, int, float, bool (`parse_bool`) or any `str -> value` function that
    raises ValueError. A ConfigError naming `key` if it does not read."""
    try:
        return parse_bool(text) if kind is bool else kind(text)
    except ValueError as e:
        if kind in (int, float):
            raise ConfigError(key, f"expected {kind.__name__}, got {text!r}") from None
        raise ConfigError(key, str(e)) from None


def parse_options(argv: Sequence[str], known: Mapping[str, Callable[[str], Any]] = types.MappingProxyType({}), *,
                  positional: Sequence[str] = ("[CONFIG]",), unknown: str = "override",
                  ) -> tuple[list[str], dict[str, Any], list[str]]:
    """The one command-line reader of the entry points (train.py, serve.py, the `python -m`
    tools): `POSITIONAL ... key=value ...` -> (positionals, options, overrides).

    positional: the names of the leading arguments without "=", in order; a name in [brackets]
    is optional (taken when present), any other is required. `known` keys are parsed by
    `parse_value` into `options`; any other `key=value` is kept, in order, in `overrides` (config
    overrides, for `load` / `load_dict`), or refused when `unknown="error"`. Raises ConfigError
    naming the missing positional, the malformed argument or the key."""
    items = list(argv)
    positionals: list[str] = []
    for name in positional:
        if not items or "=" in items[0]:
            if not name.startswith("["):
                raise ConfigError(name, "is required (before the key=value arguments)")
            break
        positionals.append(items.pop(0))
    after = " ".join(name.strip("[]") for name in positional)
    options: dict[str, Any] = {}
    overrides: list[str] = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(item, f"arguments after {after} must look like key=value" if after else
                              "arguments must look like key=value")
        if key in known:
            options[key] = parse_value(key, value, known[key])
        elif unknown == "error":
            raise ConfigError(key, f"unknown option (known: {', '.join(sorted(known))})")
        else:
            overrides.append(item)
    return positionals, options, overrides


def require_positive(options: Mapping[str, Any], *keys: str) -> None:
    """ConfigError naming the first of `keys` in `options` that is not > 0."""
    for key in keys:
        if key in options and options[key] <= 0:
            raise ConfigError(key, f"must be positive, got {options[key]}")
