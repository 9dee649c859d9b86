"""The config sections: one dataclass per part of the trainer, each with in-section ``validate``.

Every section's ``validate(prefix)`` returns a list of problem lines (empty when fine); each line
names the dotted key under ``prefix`` (the section's place in the root config), the bad value and
the fix. Cross-section checks live on the root :class:`camopd_megatron.config.Config`.
Defaults follow the paper's settings (``docs/algorithm.md``); a tiny CPU-sized model is the default so
the demo runs anywhere.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Optional

from camopd_megatron.config.errors import problem
from camopd_megatron.config.moe import MOE_ARCH_FIELDS, MoEConfig, moe_arch, moe_from_saved

__all__ = [
    "RunConfig",
    "ModelConfig",
    "MoEConfig",
    "ParallelConfig",
    "TeacherConfig",
    "BranchDataConfig",
    "DataConfig",
    "RolloutConfig",
    "SchedulerConfig",
    "SelectionConfig",
    "LossConfig",
    "OptimConfig",
    "PrecisionConfig",
    "CheckpointConfig",
    "EvalConfig",
    "LoggingConfig",
    "DTypeName",
    "InitName",
    "STUDENT_ROLE",
    "ARCH_FIELDS",
    "REQUIRED_FOR_RANDOM",
    "CONVERT_HINT",
]

DTypeName = Literal["auto", "fp32", "bf16", "fp16"]
"""Parameter / compute dtype names (``auto``: bf16 on GPU, fp32 on CPU)."""

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

STUDENT_ROLE = "student"
"""Name of the student's rank group (reserved: no teacher or teacher group may use it)."""


def _require(ok: bool, problems: list[str], key: str, value: Any, expected: str, fix: str) -> None:
    """Append a problem line unless ``ok``."""
    if not ok:
        problems.append(problem(key, value, expected, fix))


def _positive(problems: list[str], prefix: str, obj: object, *names: str) -> None:
    """Require ``obj.<name> > 0`` for each name (None is skipped: Optional fields)."""
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            _require(value > 0, problems, f"{prefix}.{name}", value, "a value > 0", f"set {prefix}.{name} to a positive number")


def _non_negative(problems: list[str], prefix: str, obj: object, *names: str) -> None:
    """Require ``obj.<name> >= 0`` for each name (None is skipped)."""
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            _require(value >= 0, problems, f"{prefix}.{name}", value, "a value >= 0", f"set {prefix}.{name} to 0 or more")


@dataclass
class RunConfig:
    """The run as a whole: seed, length, where outputs go."""

    seed: int = 1234
    """Global random seed (rollout sampling, data order, CPU weight init)."""
    steps: int = 100
    """Number of optimizer steps to train."""
    output_dir: str = "outputs/run"
    """Directory for checkpoints, TensorBoard logs and the resolved config."""
    log_level: str = "INFO"
    """Python logging level name: DEBUG, INFO, WARNING, ERROR or CRITICAL."""
    exit_duration_min: Optional[float] = None
    """Wall-clock minutes after which the run finishes its step, saves and exits (as on SIGTERM); None = no limit."""

    def validate(self, prefix: str = "run") -> list[str]:
        """In-section problems (empty when valid)."""
        problems: list[str] = []
        _non_negative(problems, prefix, self, "seed")
        _positive(problems, prefix, self, "steps", "exit_duration_min")
        _require(bool(self.output_dir), problems, f"{prefix}.output_dir", self.output_dir, "a non-empty path", "set a directory")
        _require(
            self.log_level.upper() in _LOG_LEVELS, problems, f"{prefix}.log_level", self.log_level,
            f"one of {', '.join(_LOG_LEVELS)}", "use a standard logging level name",
        )
        return problems

    @property
    def log_level_value(self) -> int:
        """The numeric ``logging`` level of :attr:`log_level`."""
        return int(getattr(logging, self.log_level.upper()))


MCORE_LLAMA3_ROPE: dict[str, float] = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192.0}
"""The llama3 RoPE-scaling settings megatron-core's GPTModel hard-codes (only ``factor`` is a parameter);
a model with other values is refused at conversion (``checkpoint/hf.py``) and at model build (``models/gpt.py``)."""


InitName = Literal["checkpoint", "random"]
"""Where a role's initial weights come from: a converted checkpoint, or random weights (an explicit choice)."""

ARCH_FIELDS: dict[str, Any] = {
    "arch": "llama", "num_layers": None, "hidden_size": None, "num_attention_heads": None, "num_query_groups": None,
    "ffn_hidden_size": None, "head_dim": None, "vocab_size": None, "vocab_pad_multiple": 128, "rotary_base": 10000.0,
    "rope_scaling": None, "norm_epsilon": 1e-6, "add_qkv_bias": False, "qk_layernorm": False, "tie_embeddings": False,
    "moe": None,
}
"""The architecture fields of :class:`ModelConfig` → their value with ``init: random`` when left out (None: no
default). With ``init: checkpoint`` each one left out is read from the checkpoint's manifest, and one that is set
must agree with it."""

REQUIRED_FOR_RANDOM = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size")
"""Architecture fields that have no default: ``init: random`` needs them set."""

CONVERT_HINT = ("convert a Hugging Face model with `python tools/convert_hf_to_megatron.py HF_DIR OUT_DIR` and point "
                "{key} at OUT_DIR")
"""How to get a checkpoint (formatted with the key to set)."""


@dataclass
class ModelConfig:
    """A role's architecture and initial weights (the student's ``model``, a teacher's ``teachers[i].model``).

    The architecture fields (:data:`ARCH_FIELDS`) are optional: with ``init: checkpoint`` (the default)
    they are read from the checkpoint's manifest before any model is built
    (:func:`camopd_megatron.checkpoint.inputs.resolve_inputs`), and a value set here that disagrees is an
    error naming both; with ``init: random`` the size fields (:data:`REQUIRED_FOR_RANDOM`) are required
    and the others take their documented defaults.
    """

    init: InitName = "checkpoint"
    """Initial weights: ``checkpoint`` (from :attr:`checkpoint`, a converted model) or ``random`` (run.seed)."""
    checkpoint: Optional[str] = None
    """The initial weights (``init: checkpoint``): a directory in our distributed checkpoint format
    (``tools/convert_hf_to_megatron.py`` writes one)."""
    arch: Optional[Literal["llama", "qwen2", "qwen3", "mistral"]] = None
    """Architecture family (RMSNorm + SwiGLU + RoPE for all; qwen2 adds QKV bias, qwen3 q/k-norm); random default llama."""
    num_layers: Optional[int] = None
    """Number of transformer layers."""
    hidden_size: Optional[int] = None
    """Model width."""
    num_attention_heads: Optional[int] = None
    """Number of query heads."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; None = multi-head attention (= num_attention_heads)."""
    ffn_hidden_size: Optional[int] = None
    """SwiGLU intermediate size."""
    head_dim: Optional[int] = None
    """Per-head width (megatron ``kv_channels``); None = hidden_size / num_attention_heads (Qwen3 sets it)."""
    vocab_size: Optional[int] = None
    """The tokenizer's vocabulary size, unpadded (padding is :attr:`padded_vocab_size`); every role's must agree."""
    vocab_pad_multiple: Optional[int] = None
    """Pad the vocabulary up to a multiple of this, independent of the TP size (every TP must divide it); random default 128."""
    seq_length: int = 256
    """Maximum context length (prompt + response) in tokens (a run setting, not read from the checkpoint)."""
    rotary_base: Optional[float] = None
    """RoPE base (theta); random default 10000."""
    rope_scaling: Optional[dict[str, Any]] = None
    """Optional RoPE scaling settings as in the Hugging Face config (e.g. llama3 ``factor``...); None = off."""
    norm_epsilon: Optional[float] = None
    """RMSNorm epsilon; random default 1e-6."""
    add_qkv_bias: Optional[bool] = None
    """Bias on the QKV projection (Qwen2 style); random default false."""
    qk_layernorm: Optional[bool] = None
    """RMSNorm on queries and keys per head (Qwen3 style); random default false."""
    tie_embeddings: Optional[bool] = None
    """Share the input embedding and the output projection; random default false."""
    moe: Optional[MoEConfig] = None
    """Mixture-of-experts layers (:class:`~camopd_megatron.config.moe.MoEConfig`); None = a dense model (with
    ``init: checkpoint``: as the checkpoint records it)."""
    init_method_std: float = 0.02
    """Std of the normal weight initialisation (random init only)."""
    transformer_impl: Literal["auto", "local", "te"] = "auto"
    """Layer implementation: ``te`` (Transformer Engine, error if missing), ``local``, or ``auto`` (te if installed)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute in the student's training backward (megatron ``recompute_granularity``):
    ``none`` keeps every activation; ``selective`` recomputes the core attention (the [s, s] scores,
    softmax and its dropout: the largest activation of the local layers, nothing to store with TE's
    fused attention); ``full`` keeps only each recomputed layer's input and runs its forward again in
    backward (``recompute_method`` / ``recompute_num_layers`` choose which layers). Numerics are
    unchanged: the same loss and gradients as ``none``. Forward-only passes (rollout, scoring,
    teachers) never recompute."""
    recompute_method: Literal["uniform", "block"] = "uniform"
    """With ``recompute: full``: ``uniform`` splits each pipeline stage's layers into groups of
    ``recompute_num_layers`` and keeps only each group's input; ``block`` recomputes the first
    ``recompute_num_layers`` layers of each stage and keeps the rest's activations."""
    recompute_num_layers: int = 1
    """With ``recompute: full``: layers per recompute group (``uniform``) or recomputed layers per
    pipeline stage (``block``); 1 to the layers of one stage (num_layers / parallel.pp)."""

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # ModelConfig(**manifest["model_config"]): the recorded plain dict
            self.moe = moe_from_saved(self.moe)
        if self.init == "random":  # the documented defaults of the fields left out (sizes have none)
            for name, default in ARCH_FIELDS.items():
                if getattr(self, name) is None and default is not None:
                    setattr(self, name, default)

    @property
    def arch_unset(self) -> list[str]:
        """Architecture fields still unknown (left out, to be read from the checkpoint)."""
        return [n for n, d in ARCH_FIELDS.items() if getattr(self, n) is None and (d is not None or n in REQUIRED_FOR_RANDOM)]

    def from_saved(self, saved: dict[str, Any], *, key: str, path: str) -> tuple["ModelConfig", list[str]]:
        """This config with every architecture field left out read from a checkpoint's ``saved`` model
        fields; a field set here that disagrees with the checkpoint is a problem naming both values."""
        problems: list[str] = []
        values: dict[str, Any] = {}
        for name in ARCH_FIELDS:
            mine = getattr(self, name)
            if name not in saved:
                continue  # an older manifest without the field: keep ours (None = the documented meaning)
            theirs = moe_from_saved(saved[name]) if name == "moe" else saved[name]
            if mine is None:
                values[name] = theirs
            elif (moe_arch(mine) != moe_arch(theirs)) if name == "moe" else mine != theirs:
                # moe: only its architecture must agree; the run keeps its own training settings
                problems.append(problem(
                    f"{key}.{name}", mine, f"the checkpoint's value {theirs!r} ({path})",
                    f"drop {key}.{name} (it is read from the checkpoint) or set it to {theirs!r}",
                ) if name != "moe" else problem(
                    f"{key}.moe", mine, f"the checkpoint's value {theirs!r} ({path})",
                    f"drop {key}.moe (it is read from the checkpoint) or make its architecture fields "
                    f"({', '.join(MOE_ARCH_FIELDS)}) equal to the checkpoint's"
                    + ("" if theirs is not None else " (a dense model: no moe)"),
                ))
        return replace(self, **values), problems

    @property
    def padded_vocab_size(self) -> int:
        """:attr:`vocab_size` rounded up to a multiple of :attr:`vocab_pad_multiple`."""
        m = max(self.vocab_pad_multiple, 1)
        return -(-self.vocab_size // m) * m

    @property
    def kv_channels(self) -> int:
        """Per-head width: :attr:`head_dim`, or hidden_size / num_attention_heads."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (:attr:`num_query_groups`, or the head count for MHA)."""
        return self.num_query_groups if self.num_query_groups is not None else self.num_attention_heads

    def validate(self, prefix: str = "model") -> list[str]:
        """In-section problems (empty when valid)."""
        problems: list[str] = []
        _positive(
            problems, prefix, self, "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
            "ffn_hidden_size", "vocab_size", "vocab_pad_multiple", "seq_length", "rotary_base", "norm_epsilon",
            "head_dim",
        )
        _non_negative(problems, prefix, self, "init_method_std")
        if self.moe is not None:
            problems += self.moe.validate(f"{prefix}.moe", num_layers=self.num_layers)
        _require(self.recompute in ("none", "selective", "full"), problems, f"{prefix}.recompute", self.recompute,
                 "one of none, selective, full", f"set {prefix}.recompute to none, selective or full")
        _require(self.recompute_method in ("uniform", "block"), problems, f"{prefix}.recompute_method",
                 self.recompute_method, "uniform or block", f"set {prefix}.recompute_method to uniform or block")
        if self.init == "random":
            for name in REQUIRED_FOR_RANDOM:
                if getattr(self, name) is None:
                    problems.append(problem(
                        f"{prefix}.{name}", None, f"a value: {prefix}.init is random, so there is no checkpoint to read it from",
                        f"set {prefix}.{name}, or use init: checkpoint with a converted checkpoint",
                    ))
        heads, groups = self.num_attention_heads, self.num_query_groups
        if heads is None or self.hidden_size is None:
            return problems
        if heads > 0 and groups is not None and groups > 0 and heads % groups:
            problems.append(problem(
                f"{prefix}.num_query_groups", groups, f"a divisor of {prefix}.num_attention_heads={heads}",
                "pick a number of key/value heads that divides the number of attention heads",
            ))
        if heads > 0 and self.hidden_size > 0 and self.hidden_size % heads and self.head_dim is None:
            problems.append(problem(
                f"{prefix}.hidden_size", self.hidden_size, f"a multiple of {prefix}.num_attention_heads={heads}",
                "make hidden_size divisible by the number of heads",
            ))
        return problems

    def layout_problems(self, tp: int, pp: int, *, tp_key: str, pp_key: str, prefix: str = "model") -> list[str]:
        """Problems splitting this model over ``tp`` tensor- x ``pp`` pipeline-parallel ranks.

        megatron shards the query heads, the key/value heads, the SwiGLU width and the padded
        vocabulary evenly over TP, and gives every pipeline stage the same number of layers, so TP
        must divide the first four and PP the layer count. ``tp_key`` / ``pp_key`` name where the
        sizes come from (``parallel.tp``, ``teachers[1].pp``, a converter's ``--tp``). Sizes that are
        not positive are skipped: :meth:`validate` reports them.
        """
        problems: list[str] = []
        if self.arch_unset:  # not known yet: checked again once read from the checkpoint
            return problems
        if tp > 0:
            sizes = [("num_attention_heads", self.num_attention_heads)]
            if self.num_query_groups is not None:
                sizes.append(("num_query_groups", self.num_query_groups))
            sizes += [("ffn_hidden_size", self.ffn_hidden_size), ("padded_vocab_size", self.padded_vocab_size)]
            bad = [f"{prefix}.{name}={size}" for name, size in sizes if size > 0 and size % tp]
            if bad:
                fix = f"use a {tp_key} that divides {'them' if len(bad) > 1 else 'it'}"
                if self.padded_vocab_size > 0 and self.padded_vocab_size % tp:  # always last in ``bad``
                    bad[-1] += (f" ({prefix}.vocab_size={self.vocab_size} padded to a multiple of "
                                f"{prefix}.vocab_pad_multiple={self.vocab_pad_multiple})")
                    fix += (f" (for the vocabulary: set {prefix}.vocab_pad_multiple to a multiple of "
                            f"{math.lcm(max(self.vocab_pad_multiple, 1), tp)})")
                problems.append(problem(tp_key, tp, "a divisor of " + ", ".join(bad), fix))
        if pp > 0 and self.num_layers > 0 and self.num_layers % pp:
            problems.append(problem(
                pp_key, pp, f"a divisor of {prefix}.num_layers={self.num_layers} (equal pipeline stages)",
                f"use a {pp_key} that divides the layer count",
            ))
        return problems

    def recompute_problems(self, pp: int, *, pp_key: str, prefix: str = "model") -> list[str]:
        """Problems of the activation-recompute keys for a student split into ``pp`` pipeline stages
        (only the student trains, so only its layout is checked; a stage count that does not divide
        the layers is :meth:`layout_problems`' report)."""
        if self.recompute != "full" or pp <= 0 or self.num_layers <= 0 or self.num_layers % pp:
            return []
        per_stage = self.num_layers // pp
        if 1 <= self.recompute_num_layers <= per_stage:
            return []
        return [problem(
            f"{prefix}.recompute_num_layers", self.recompute_num_layers,
            f"1 to {per_stage} with {prefix}.recompute=full (the layers of one pipeline stage: "
            f"{prefix}.num_layers={self.num_layers} / {pp_key}={pp})",
            f"set {prefix}.recompute_num_layers between 1 and {per_stage}",
        )]


@dataclass
class ParallelConfig:
    """The student's parallel layout and the process-group backend."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    dp: Optional[int] = None
    """Data-parallel size; None = derived from the world size left after the teachers' ranks."""
    ep: int = 1
    """Expert-parallel size (``model.moe``): each EP rank holds num_experts / ep experts; the EP group spans
    the rest of the TP group (with ``etp`` < ``tp``) and then DP replicas of the same pipeline stage."""
    etp: Optional[int] = None
    """Expert tensor-parallel size (megatron ``expert_tensor_parallel_size``); None = ``tp``; must divide ``tp``."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism inside the TP group (required with ``model.moe`` and tp > 1)."""
    use_distributed_optimizer: bool = False
    """Shard the optimizer state over the data-parallel group (megatron's distributed optimizer)."""
    overlap_grad_reduce: bool = False
    """Reduce (or, with the distributed optimizer, reduce-scatter) each gradient bucket over DP as
    soon as the last micro-batch's backward has produced all its gradients, asynchronously, while the
    backward continues (megatron DDP ``overlap_grad_reduce``); the step waits for them at its end.
    The same sums as without: the parameters after a step are identical."""
    overlap_param_gather: bool = False
    """With ``use_distributed_optimizer``: after the optimizer step, gather the updated parameter
    shards bucket by bucket, asynchronously, each waited for just before its first use (a module's
    forward pre-hook; code that reads weights outside a module's forward, the fused output projection
    and the lean rollout decoder, waits the same way) instead of all at once at the end of the step."""
    bucket_size: Optional[int] = None
    """Parameters per gradient-reduce / parameter-gather bucket when overlapping (megatron DDP
    ``bucket_size``); None = megatron's default, max(40M, 1M x DP). Smaller buckets start
    communicating earlier; without overlap every buffer is one bucket."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; ``auto`` = nccl with CUDA, gloo without."""
    timeout_s: float = 600.0
    """Process-group timeout in seconds (a hung collective fails after this)."""

    def validate(self, prefix: str = "parallel") -> list[str]:
        """In-section problems (empty when valid)."""
        problems: list[str] = []
        _positive(problems, prefix, self, "tp", "pp", "dp", "ep", "etp", "timeout_s", "bucket_size")
        return problems


@dataclass
class TeacherConfig:
    """One frozen teacher: which branches it scores and where it runs."""

    name: str
    """Unique teacher name (also the default name of its rank group)."""
    init: InitName = "checkpoint"
    """Initial weights: ``checkpoint`` (from :attr:`checkpoint`, a converted model) or ``random`` (run.seed)."""
    checkpoint: Optional[str] = None
    """The teacher's weights (``init: checkpoint``): our distributed checkpoint dir (``tools/convert_hf_to_megatron.py``)."""
    model: Optional[ModelConfig] = None
    """The teacher's architecture: read from its checkpoint (fields set here must agree); with ``init: random``
    these fields, or the student's architecture when left out. Its ``init`` and ``checkpoint`` are the teacher's."""
    branches: list[str] = field(default_factory=list)
    """The prompt branches this teacher scores (each scheduled branch has exactly one teacher)."""
    placement: Literal["separate", "colocated"] = "colocated"
    """``separate``: its own rank range; ``colocated``: on the student's ranks with the student's layout."""
    tp: Optional[int] = None
    """Tensor-parallel size; None = 1 when separate, the student's when colocated."""
    pp: Optional[int] = None
    """Pipeline-parallel size; None = 1 when separate, the student's when colocated."""
    dp: Optional[int] = None
    """Data-parallel size (replicas); None = 1 when separate, the student's when colocated."""
    ep: Optional[int] = None
    """Expert-parallel size of an MoE teacher; None = 1 when separate, the student's when colocated."""
    etp: Optional[int] = None
    """Expert tensor-parallel size of an MoE teacher; None = its ``tp`` when separate, the student's when colocated."""
    group: Optional[str] = None
    """Teachers naming the same group share one rank range (time-shared; separate placement only)."""
    dtype: DTypeName = "auto"
    """Weights/compute dtype; ``auto`` = bf16 on GPU, fp32 on CPU."""
    offload: bool = False
    """Keep the weights in host memory between uses (colocated teachers)."""

    def __post_init__(self) -> None:
        if self.model is not None and self.model.checkpoint in (None, self.checkpoint):
            self.model = replace(self.model, init=self.init, checkpoint=self.checkpoint)  # one source: the teacher's keys

    def validate(self, prefix: str = "teacher") -> list[str]:
        """In-section problems (empty when valid)."""
        problems: list[str] = []
        _require(bool(self.name), problems, f"{prefix}.name", self.name, "a non-empty name", "name the teacher")
        if self.model is not None:
            if self.model.checkpoint not in (None, self.checkpoint):
                problems.append(problem(
                    f"{prefix}.model.checkpoint", self.model.checkpoint, f"unset (the teacher's weights are {prefix}.checkpoint)",
                    f"move it to {prefix}.checkpoint",
                ))
            problems += self.model.validate(f"{prefix}.model")
        _positive(problems, prefix, self, "tp", "pp", "dp", "ep", "etp")
        _require(
            len(set(self.branches)) == len(self.branches), problems, f"{prefix}.branches", self.branches,
            "each branch at most once", "remove the duplicate branch names",
        )
        if self.placement == "colocated" and self.group is not None:
            problems.append(problem(
                f"{prefix}.group", self.group, "no group for a colocated teacher (it runs on the student's ranks)",
                "drop 'group' or set placement: separate",
            ))
        if self.name == STUDENT_ROLE:
            problems.append(problem(
                f"{prefix}.name", self.name, f"a name other than {STUDENT_ROLE!r} (the student's rank group)",
                "rename the teacher",
            ))
        if self.placement == "separate" and self.group == STUDENT_ROLE:
            problems.append(problem(
                f"{prefix}.group", self.group, f"a group name other than {STUDENT_ROLE!r} (the student's rank group)",
                "rename the group",
            ))
        return problems

    @property
    def role_name(self) -> str:
        """The rank group hosting this teacher: the student's when colocated, else :attr:`group` or its name."""
        return STUDENT_ROLE if self.placement == "colocated" else (self.group or self.name)

    @property
    def separate_layout(self) -> tuple[int, int, int]:
        """``(tp, pp, dp)`` of its own rank group when separate (None = 1); colocated teachers use the student's."""
        return (self.tp or 1, self.pp or 1, self.dp or 1)

    @property
    def separate_experts(self) -> tuple[int, int]:
        """``(ep, etp)`` of its own rank group when separate (ep None = 1, etp None = its tp)."""
        return (self.ep or 1, self.etp or self.separate_layout[0])


@dataclass
class BranchDataConfig:
    """The prompt files of one branch (e.g. ``general`` or ``domain``)."""

    paths: list[str] = field(default_factory=list)
    """Prompt files (jsonl / parquet) of this branch."""
    weights: Optional[list[float]] = None
    """Sampling weight per path; None = every prompt of the branch equally likely."""

    def validate(self, prefix: str = "branch") -> list[str]:
        """In-section problems (empty when valid)."""
        problems: list[str] = []
        if self.weights is not None:
            _require(
                len(self.weights) == len(self.paths), problems, f"{prefix}.weights", self.weights,
                f"one weight per path ({len(self.paths)} paths)", "give as many weights as paths, or drop weights",
            )
            _require(
                all(w >= 0 for w in self.weights) and sum(self.weights) > 0, problems, f"{prefix}.weights",
                self.weights, "non-negative weights with a positive sum", "fix the weights",
            )
        return problems


@dataclass
class DataConfig:
    """Prompt data per branch, tokenizer and chat formatting."""

    branches: dict[str, BranchDataConfig] = field(default_factory=dict)
    """Branch name → its prompt files; empty = synthetic prompts (demo, tests)."""
    max_prompt_tokens: int = 512
    """Longest prompt in tokens (after the chat template); longer ones are handled per :attr:`too_long`."""
    too_long: Literal["truncate", "drop"] = "truncate"
    """A prompt over max_prompt_tokens: keep its last tokens (``truncate`` from the left, BOS kept) or ``drop`` it (counted, logged)."""
    shuffle: bool = True
    """Shuffle prompts each epoch (seeded by run.seed)."""
    heldout_fraction: float = 0.0
    """Fraction of each branch kept out of training for eval, in [0, 1)."""
    tokenizer: Optional[str] = None
    """Tokenizer path (HF tokenizer.json dir or sentencepiece model); None = the synthetic byte tokenizer."""
    chat_template: Literal["plain", "chatml", "llama3"] = "plain"
    """How a prompt is wrapped before tokenisation."""
    on_bad_line: Literal["error", "skip"] = "error"
    """A malformed record: stop with an error naming file and line, or skip it (counted, logged)."""

    def validate(self, prefix: str = "data") -> list[str]:
        """In-section problems (empty when valid)."""
        problems: list[str] = []
        _positive(problems, prefix, self, "max_prompt_tokens")
        _require(
            0.0 <= self.heldout_fraction < 1.0, problems, f"{prefix}.heldout_fraction", self.heldout_fraction,
            "a fraction in [0, 1)", "use e.g. 0.0 (no held-out set) or 0.05",
        )
        for name, branch in self.branches.items():
            problems += branch.validate(f"{prefix}.branches.{name}")
        return problems


@dataclass
class RolloutConfig:
    """On-policy sampling from the student."""

    prompts_per_step: int = 8
    """Prompts per optimizer step, global over data-parallel ranks (one response each)."""
    max_new_tokens: int = 64
    """Maximum response length in tokens."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy); log-probs use the temperature-scaled distribution."""
    top_k: int = 0
    """Top-k truncation when sampling; 0 = off."""
    top_p: float = 1.0
    """Nucleus truncation when sampling, in (0, 1]; 1 = off."""
    greedy: bool = False
    """Take the arg-max token instead of sampling."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a response (in addition to the tokenizer's end-of-sequence)."""
    use_kv_cache: bool = True
    """Reuse keys/values across decoding steps."""
    micro_batch_size: int = 8
    """Prompts decoded together per data-parallel rank."""
    overlap_teachers: bool = True
    """With ``placement: separate`` teachers: stream each rollout micro-batch to its teachers while it is
    decoded, in blocks of ``teacher_block_positions`` new positions, so they score it while the student
    samples (and, with ``selection.student_logprobs: recompute``, while the student recomputes its own
    log-probs). A teacher at TP = PP = 1 (dense) extends a KV cache with each block, so only the last
    block's scoring is left when the decode ends; any other teacher scores each micro-batch whole once
    it is decoded, overlapping the next micro-batch. The results are those of ``false`` up to float
    rounding (the blocked teacher forward sums in another order). No effect on colocated teachers."""
    teacher_block_positions: int = 16
    """Positions per block streamed to the teachers with ``overlap_teachers`` (0: each micro-batch whole,
    once decoded). Smaller blocks leave less teacher work after the decode, at one more message and one
    more pass over the teacher's weights per block."""

    def validate(self, prefix: str = "rollout") -> list[str]:
        """In-section problems (empty when valid)."""
        problems: list[str] = []
        _positive(problems, prefix, self, "prompts_per_step", "max_new_tokens", "micro_batch_size")
        _non_negative(problems, prefix, self, "temperature", "top_k", "teacher_block_positions")
        _require(
            0.0 < self.top_p <= 1.0, problems, f"{prefix}.top_p", self.top_p, "a value in (0, 1]", "use 1.0 for no truncation",
        )
        _require(
            all(t >= 0 for t in self.stop_token_ids), problems, f"{prefix}.stop_token_ids", self.stop_token_ids,
            "non-negative token ids", "remove the negative ids",
        )
        return problems


@dataclass
class SchedulerConfig:
    """Which branch each optimizer step trains on."""

    mode: Literal["alternating", "mixed"] = "alternating"
    """``alternating``: one branch per step following :attr:`pattern` (CaMOPD); ``mixed``: every step mixes branches (vanilla MOPD)."""
    pattern: list[str] = field(default_factory=lambda: ["general", "general", "general", "domain"])
    """Periodic branch sequence for ``alternating`` (default 3 general : 1 domain)."""
    mixed_shares: dict[str, float] = field(default_factory=lambda: {"general": 1.0, "domain": 1.0})
    """Branch → relative share of each step's prompts for ``mixed``."""

    def validate(self, prefix: str = "scheduler") -> list[str]:
        """In-section problems (empty when valid)."""
        problems: list[str] = []
        if self.mode == "alternating":
            _require(
                len(self.pattern) > 0, problems, f"{prefix}.pattern", self.pattern, "a non-empty list of branch names",
                "e.g. [general, general, general, domain]",
            )
        else:
            _require(
                len(self.mixed_shares) > 0, problems, f"{prefix}.mixed_shares", self.mixed_shares,
                "at least one branch", "e.g. {general: 1.0, domain: 1.0}",
            )
        # the other mode's key has no effect: set to a non-default value it is a mistake, not a no-op
        ignored, default = (("mixed_shares", SchedulerConfig().mixed_shares) if self.mode == "alternating"
                            else ("pattern", SchedulerConfig().pattern))
        if getattr(self, ignored) != default:
            problems.append(problem(
                f"{prefix}.{ignored}", getattr(self, ignored), f"its default ({default}): {prefix}.mode={self.mode} ignores it",
                f"drop {prefix}.{ignored}, or set {prefix}.mode: {'mixed' if self.mode == 'alternating' else 'alternating'}",
            ))
        for name, share in self.mixed_shares.items():
            _require(share > 0, problems, f"{prefix}.mixed_shares.{name}", share, "a share > 0", "remove the branch or give it a positive share")
        return problems

    @property
    def branches(self) -> list[str]:
        """The branches this schedule trains on, in first-use order."""
        names = self.pattern if self.mode == "alternating" else list(self.mixed_shares)
        return list(dict.fromkeys(names))


@dataclass
class SelectionConfig:
    """Gap-based sample selection (CaMOPD §4)."""

    enabled: bool = True
    """Keep only the highest-gap samples; off = keep all (r_b still applies to those the rule would keep)."""
    rho: dict[str, float] = field(default_factory=lambda: {"general": 0.8, "domain": 0.8})
    """Branch → cumulative score mass to keep, in (0, 1]."""
    score: dict[str, Literal["abs", "positive"]] = field(default_factory=lambda: {"general": "abs", "domain": "positive"})
    """Branch → sample score: mean |gap| (``abs``) or mean max(gap, 0) (``positive``)."""
    scale_only_selected: bool = True
    """Apply the advantage scale r_b only to samples the rho-rule keeps."""
    scale_mode: Literal["advantage", "lr"] = "advantage"
    """How r_b acts: ``advantage`` multiplies the kept samples' advantage (the paper's formula; the global
    gradient clip and Adam's normalisation remove most of a uniform factor); ``lr`` multiplies the step's
    learning rate by r_b instead (one r for the whole step: needs ``scheduler.mode: alternating`` or equal
    r_b over the mixed branches, and ``enabled: true`` or ``scale_only_selected: false``)."""
    student_logprobs: Literal["recompute", "rollout"] = "recompute"
    """Student log-probs for the gap: a pre-update training forward, or the rollout engine's (saves a forward).
    With ``recompute`` and a selection that does not depend on the gaps (``enabled: false`` and r_b on every
    sample, e.g. ``vanilla_mopd``), no separate forward runs: the training forward's detached log-probs
    are the same pre-update values and give the gaps."""

    def validate(self, prefix: str = "selection") -> list[str]:
        """In-section problems (empty when valid)."""
        problems: list[str] = []
        for name, rho in self.rho.items():
            _require(0.0 < rho <= 1.0, problems, f"{prefix}.rho.{name}", rho, "a fraction in (0, 1]", "use e.g. 0.8 (1.0 keeps all)")
        return problems


@dataclass
class LossConfig:
    """The distillation loss (advantage scaling, importance weights, options)."""

    adv_scale: dict[str, float] = field(default_factory=lambda: {"general": 2.0, "domain": 1.0})
    """Branch → advantage scale r_b."""
    is_low: float = 0.5
    """Lower bound of the truncated importance ratio pi/mu."""
    is_high: float = 2.0
    """Upper bound of the truncated importance ratio pi/mu."""
    is_mode: Literal["mask", "clamp"] = "mask"
    """Ratios outside [is_low, is_high]: weight 0 (``mask``, the paper) or clamped to the bound."""
    adv_clip: Optional[float] = None
    """Clip the advantage to +-adv_clip (MOPD paper: 5); None = off."""
    teacher_temperature: Optional[float] = None
    """Softmax temperature the teachers score at; None = the temperature of the student's log-probs π and μ
    (``rollout.temperature``, or 1 when greedy or 0), so the gap compares like with like."""
    max_bad_teacher_steps: int = 3
    """Steps skipped because a teacher returned NaN/inf log-probs before the run aborts."""

    def validate(self, prefix: str = "loss") -> list[str]:
        """In-section problems (empty when valid)."""
        problems: list[str] = []
        _positive(problems, prefix, self, "is_low", "adv_clip", "teacher_temperature")
        _non_negative(problems, prefix, self, "max_bad_teacher_steps")
        _require(
            self.is_low < self.is_high, problems, f"{prefix}.is_high", self.is_high,
            f"a value > {prefix}.is_low={self.is_low}", "use e.g. is_low: 0.5, is_high: 2.0",
        )
        for name, scale in self.adv_scale.items():
            _require(scale > 0, problems, f"{prefix}.adv_scale.{name}", scale, "a scale > 0", "use 1.0 for no scaling")
        return problems


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (one optimizer and one schedule for all branches)."""

    lr: float = 2e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Final learning rate of the cosine / linear decay."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Decay after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to lr."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 = off."""
    micro_batch_size: int = 4
    """Sequences per training forward/backward on one data-parallel rank."""
    branch_state: Literal["shared", "per_branch"] = "shared"
    """Adam moments of the branches. ``shared``: one exp_avg / exp_avg_sq for every step, so a domain
    step of G,G,G,D moves mostly along the general momentum (β1 = 0.9). ``per_branch``: one set of
    moments per scheduled branch, each with its own step count for the bias correction (as if each
    branch had an Adam of its own over the shared weights); a step uses and updates only its branch's
    moments. The learning-rate schedule counts every step either way. Needs ``scheduler.mode:
    alternating`` (a mixed step has no single branch). Saved in checkpoints (resharded across DP like
    the shared state); a checkpoint resumes only with the ``branch_state`` and branches it was saved with."""

    def validate(self, prefix: str = "optim") -> list[str]:
        """In-section problems (empty when valid)."""
        problems: list[str] = []
        _positive(problems, prefix, self, "lr", "adam_eps", "micro_batch_size")
        _non_negative(problems, prefix, self, "min_lr", "warmup_steps", "weight_decay", "clip_grad")
        _require(self.min_lr <= self.lr, problems, f"{prefix}.min_lr", self.min_lr, f"<= {prefix}.lr={self.lr}", "lower min_lr")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            _require(0.0 <= value < 1.0, problems, f"{prefix}.{name}", value, "a value in [0, 1)", "use e.g. 0.9 / 0.999")
        return problems


@dataclass
class PrecisionConfig:
    """Parameter dtype and FP8."""

    params_dtype: DTypeName = "auto"
    """Student parameter/compute dtype; ``auto`` = bf16 on GPU, fp32 on CPU."""
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    """FP8 format (Transformer Engine, GPU only); None = off."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    """FP8 scaling recipe (used only when fp8 is set)."""
    fp8_param: bool = False
    """Keep the student's weights in FP8 (megatron ``fp8_param``; halves weight memory); needs fp8."""

    def validate(self, prefix: str = "precision") -> list[str]:
        """In-section problems (empty when valid)."""
        return []


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    dir: Optional[str] = None
    """Checkpoint directory; None = ``<run.output_dir>/checkpoints``."""
    save_interval: int = 50
    """Save every this many steps (and at the end); 0 = only at the end."""
    keep_last: int = 2
    """Keep this many recent checkpoints; 0 = keep all."""
    resume: Literal["auto", "never", "must"] = "auto"
    """``auto``: resume from the latest checkpoint in dir if any; ``never``; ``must``: error if none."""
    load: Optional[str] = None
    """Resume from this checkpoint directory instead of the latest in dir."""

    def validate(self, prefix: str = "checkpoint") -> list[str]:
        """In-section problems (empty when valid)."""
        problems: list[str] = []
        _non_negative(problems, prefix, self, "save_interval", "keep_last")
        return problems


@dataclass
class EvalConfig:
    """Periodic evaluation on held-out prompts."""

    interval: int = 0
    """Evaluate every this many steps; 0 = off."""
    num_prompts: int = 64
    """Held-out prompts per branch per evaluation."""
    max_new_tokens: Optional[int] = None
    """Response length for eval; None = rollout.max_new_tokens."""
    teacher_scored: bool = True
    """Built-in eval: greedy answers on held-out prompts scored by each branch's teacher (eval/<branch>/*)."""

    def validate(self, prefix: str = "eval") -> list[str]:
        """In-section problems (empty when valid)."""
        problems: list[str] = []
        _non_negative(problems, prefix, self, "interval")
        _positive(problems, prefix, self, "num_prompts", "max_new_tokens")
        return problems


@dataclass
class LoggingConfig:
    """Metrics, TensorBoard and diagnostics."""

    tensorboard: bool = True
    """Write TensorBoard event files."""
    log_interval: int = 1
    """Log metrics every this many steps."""
    dir: Optional[str] = None
    """TensorBoard directory; None = ``<run.output_dir>/tensorboard``."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""
    diagnostics_interval: int = 0
    """Branch-conflict probe (general vs domain gradient cosine) every this many steps; 0 = off."""
    diagnostics_prompts: int = 8
    """Prompts per branch in each probe batch (global over data-parallel ranks)."""
    coherence_samples: int = 0
    """Per-sample gradients of the gradient-coherence probe (every ``diagnostics_interval`` steps, per
    branch of the step: Coh of all of them, of the rho-rule's selected ones, and the gain); each costs one
    forward/backward of the student, so at most 64. 0 = off."""

    def validate(self, prefix: str = "logging") -> list[str]:
        """In-section problems (empty when valid)."""
        problems: list[str] = []
        _positive(problems, prefix, self, "log_interval")
        _non_negative(problems, prefix, self, "diagnostics_interval", "coherence_samples")
        _positive(problems, prefix, self, "diagnostics_prompts")
        _require(
            self.coherence_samples <= 64, problems, f"{prefix}.coherence_samples", self.coherence_samples,
            "at most 64 (one backward per sample)", f"lower {prefix}.coherence_samples",
        )
        return problems
