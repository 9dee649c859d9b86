"""Benchmark: end-to-end optimizer steps of OUR trainer on the TRL peer's model dimensions.

    python -m camopd_megatron.bench.step                              # small, 1 teacher, 1 process
    python -m camopd_megatron.bench.step --size large --steps 5
    python -m camopd_megatron.bench.step --teachers 2                 # the camopd preset (general + domain)
    python -m camopd_megatron.bench.step --layout sep4 --teachers 2   # torchrun: student TP=2 + 2 teacher ranks
    python -m camopd_megatron.bench.step --layout sep2 --rollout-micro-batch 4 --no-overlap-teachers
                                                                      # torchrun: student rank + teacher rank
    python -m camopd_megatron.bench.step --json                       # one JSON line on stdout

What runs is ``camopd_megatron.trainer.train(cfg)`` itself (config built with ``config_from_dict``),
on the dimensions of the TRL peer's ``run_peer.py --arch llama`` (located by ``bench.vs_trl --peer-dir``;
Llama-style: RMSNorm, RoPE, SwiGLU, GQA, untied embeddings, no QKV bias):

* small: hidden 256, 4 layers, 4 heads / 2 kv heads, FFN 688, vocab 8192, 64 new tokens;
* large: hidden 512, 8 layers, 8 heads / 4 kv heads, FFN 1376, vocab 32000, 128 new tokens;
* qwen: small's model with the Qwen-family vocabulary, 151936 (``run_peer.py --vocab 151936``);

batch 8 (``rollout.prompts_per_step``), 32-token prompts, fp32, T = 1 sampling without top-k/top-p.
Prompts are 32 random words of a word-level ``tokenizer.json`` built here (vocabulary ``<pad> <eos>
<bos> <unk> w0 .. w{V-5}``, exactly the model's, like the peer's), written as JSONL to a scratch dir.
Responses are FIXED length, like the peer's ``min_new_tokens = max_new_tokens``: the tokenizer's
``tokenizer_config.json`` declares no EOS (``eos_token: null``), so no token ends a response early.

Settings. ``--teachers 1`` is the head-to-head with TRL: the ``vanilla_mopd`` preset reduced to one
branch (``scheduler.mode: mixed`` with only ``general``, selection off, r = 1) and one teacher.
``--teachers 2`` is the ``camopd`` preset (3:1 alternating general/domain, ρ-selection on), two
teachers. Teachers are the student's own random initialisation (``init: random``): their weights do
not change the work done per step. ``--layout single`` is one process (world 1, teachers
``placement: colocated``); ``sep4`` launches ``torch.distributed.run --nproc_per_node 4`` with the
student at TP = 2 on ranks 0-1 and each teacher on its own rank (``placement: separate``); ``sep2``
launches 2 ranks, the student (TP = 1) on rank 0 and the teacher(s) on rank 1 (``placement:
separate``, time-shared when 2). ``--rollout-micro-batch`` (``rollout.micro_batch_size``, default the
whole batch), ``--no-overlap-teachers`` (``rollout.overlap_teachers: false``) and ``--teacher-block``
(``rollout.teacher_block_positions``) measure the teachers overlapped with the rollout (BENCHMARKS.md).

Timing boundary (the peer's): imports, model and optimizer construction are excluded. An
``eval_fn`` hook, which the trainer calls before step 1 and after every step, stamps the loop's
start and end; ``wall_s`` spans all N steps (the peer's ``on_train_begin`` → ``on_train_end``),
the final checkpoint save after the loop is outside it. The first step is reported apart and the
steady mean is over steps 2..N. Peak RSS is ``VmHWM`` at the end of the last step (summed over the
ranks for sep4, each rank read when its ``train`` returns). Fields match the peer's JSON
(``step_s_steady_mean``, ``gen_tokens_per_s``, ``train_tokens_per_s`` = (prompt + response tokens)
/ ``wall_s``, ``peak_rss_mb``) plus ``stages_s``: the steady mean of every ``time/*`` metric (``stages_cpu_s``:
of every ``cpu_time/*``, the stage thread's CPU time), and (one
process) ``floor``: the train stage's matmul FLOPs (:func:`train_stage_flops`) over this machine's fp32
matmul rate on the output layer's product, measured in the same process before and after the loop (the
best of both, :func:`train_floor`), beside the measured train stage (``train_over_floor``); at one thread
also on the stage thread's CPU clock (``floor.cpu``), which leaves out time the hypervisor of a virtual
machine gave the core to another guest. ``--probe-each-step`` also probes that rate before step 1 and
after every step (outside the loop's wall time and peak memory) and reports each step's train / floor at
the better probe around it (``floor.paired``, :func:`paired_floor`): the stage and its floor then share
the host's speed of that moment.

Environment: ``python -m camopd_megatron.bench.step`` sets ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` to
``--threads`` and ``THP_MEM_ALLOC_ENABLE=1`` (torch's CPU allocator then backs every allocation of 2 MiB or
more with transparent huge pages: a fresh 300 MB logits-sized buffer page-faults 512x fewer times) unless
they are set already; ``bench.vs_trl`` gives the peer the same environment.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from camopd_megatron.bench import set_thread_env
from camopd_megatron.bench.calibrate import matmul_rates

logger = logging.getLogger(__name__)

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
"""The peer's special tokens, at ids 0..3 (word ``w{i}`` is id 4 + i)."""

SIZES: dict[str, dict[str, int]] = {
    "small": {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "ffn": 688, "vocab": 8192, "new_tokens": 64},
    "large": {"hidden": 512, "layers": 8, "heads": 8, "kv_heads": 4, "ffn": 1376, "vocab": 32000, "new_tokens": 128},
    "qwen": {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "ffn": 688, "vocab": 151936, "new_tokens": 64},
}
"""The peer's two settings (``run_peer.py`` defaults and ``run_all.sh``'s LARGE), and ``qwen``: small's model with
the Qwen-family vocabulary (151,936), where the output layer is most of the work."""

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = {"single": 1, "sep2": 2, "sep4": 4}
"""Benchmark layouts and their world sizes."""


# ---------------------------------------------------------------------------------- inputs
def write_tokenizer(directory: Path, vocab_size: int) -> Path:
    """A word-level ``tokenizer.json`` (+ a config that declares no EOS) of exactly ``vocab_size`` ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    if vocab_size <= len(SPECIALS):
        raise ValueError(f"vocab_size={vocab_size} must exceed the {len(SPECIALS)} special tokens")
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": len(SPECIALS) + i for i in range(vocab_size - len(SPECIALS))})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    directory.mkdir(parents=True, exist_ok=True)
    core.save(str(directory / "tokenizer.json"))
    # eos_token: null → the tokenizer has no EOS id, so every response runs to max_new_tokens
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": None, "pad_token": "<pad>"}))
    return directory / "tokenizer.json"


def write_prompts(path: Path, n: int, prompt_len: int, vocab_size: int, seed: int) -> Path:
    """``n`` JSONL records ``{"prompt": "w.. w.."}`` of ``prompt_len`` random words (one token each)."""
    rng = random.Random(seed)
    n_words = vocab_size - len(SPECIALS)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": " ".join(f"w{rng.randrange(n_words)}" for _ in range(prompt_len))}) + "\n")
    return path


def bench_config_dict(work: Path, *, size: str, teachers: int, layout: str, steps: int, batch: int = 8,
                      prompt_len: int = 32, new_tokens: Optional[int] = None, seed: int = 1234,
                      dims: Optional[dict[str, int]] = None, student_logprobs: str = "recompute",
                      rollout_micro_batch: Optional[int] = None, overlap_teachers: bool = True,
                      teacher_block: Optional[int] = None, moe_experts: int = 0, moe_topk: int = 2) -> dict[str, Any]:
    """The trainer config (a plain dict for ``config_from_dict``) of one benchmark setting.

    Writes the tokenizer and the prompt files under ``work``. ``dims`` overrides entries of
    :data:`SIZES` (tests use a micro model). ``student_logprobs``: ``selection.student_logprobs``
    (the presets' ``recompute``, or ``rollout``: μ for the gaps, one student forward fewer).
    ``rollout_micro_batch``: ``rollout.micro_batch_size`` (None: the whole batch at once);
    ``overlap_teachers``: ``rollout.overlap_teachers``; ``teacher_block``: ``rollout.teacher_block_positions``
    (None: the config's default). ``moe_experts`` > 0: every layer of the student
    (and of its random teachers, which take its architecture) is an MoE layer of that many experts, top
    ``moe_topk``, each expert FFN/top-k wide (a token's active FFN width stays the dense one), EP = 1.
    """
    from camopd_megatron.config import config_to_dict, load_config
    from camopd_megatron.config.loader import deep_merge

    if size not in SIZES:
        raise ValueError(f"size={size!r}: expected one of {sorted(SIZES)}")
    if teachers not in (1, 2):
        raise ValueError(f"teachers={teachers!r}: expected 1 (single branch, vanilla_mopd-style) or 2 (camopd preset)")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected 'single' (one process), 'sep2' (torchrun, 2 ranks) or "
                         "'sep4' (torchrun, 4 ranks)")
    d = {**SIZES[size], **(dims or {})}
    new = int(new_tokens or d["new_tokens"])
    tok = write_tokenizer(work / "tokenizer", d["vocab"])
    n_prompts = max(64, batch * steps * 2)
    branches = ["general"] if teachers == 1 else ["general", "domain"]
    data = {b: {"paths": [str(write_prompts(work / f"{b}.jsonl", n_prompts, prompt_len, d["vocab"], seed + i))]}
            for i, b in enumerate(branches)}
    placement = "colocated" if layout == "single" else "separate"
    preset = "vanilla_mopd" if teachers == 1 else "camopd"
    base = config_to_dict(load_config(str(REPO / "examples" / "configs" / f"{preset}.yaml")))
    over: dict[str, Any] = {
        "run": {"steps": steps, "seed": seed, "output_dir": str(work / "run"), "log_level": "WARNING"},
        "model": {"init": "random", "checkpoint": None, "arch": "llama", "num_layers": d["layers"], "hidden_size": d["hidden"],
                  "num_attention_heads": d["heads"], "num_query_groups": d["kv_heads"], "ffn_hidden_size": d["ffn"],
                  "vocab_size": d["vocab"], "seq_length": prompt_len + new, "tie_embeddings": False,
                  "transformer_impl": "local",
                  **({"moe": {"num_experts": moe_experts, "router_topk": moe_topk,
                              "ffn_hidden_size": max(d["ffn"] // moe_topk, 1)}} if moe_experts else {})},
        "parallel": {"tp": 2 if layout == "sep4" else 1, "pp": 1, "backend": "gloo"},
        "teachers": [{"name": b, "init": "random", "branches": [b], "placement": placement,
                      **({"group": "teachers"} if layout == "sep2" else {})} for b in branches],
        "data": {"branches": data, "tokenizer": str(tok), "max_prompt_tokens": prompt_len, "shuffle": True},
        # one micro-batch of the whole step (the peer: batch 8, no accumulation), fixed-length responses
        "rollout": {"prompts_per_step": batch, "max_new_tokens": new, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                    "micro_batch_size": rollout_micro_batch or batch, "use_kv_cache": True,
                    "overlap_teachers": overlap_teachers,
                    **({"teacher_block_positions": teacher_block} if teacher_block is not None else {})},
        # the peer's optimizer: AdamW, lr 1e-4 constant, grad clip 1.0, no weight decay
        "optim": {"lr": 1e-4, "lr_schedule": "constant", "clip_grad": 1.0, "micro_batch_size": batch,
                  "weight_decay": 0.0},
        "precision": {"params_dtype": "fp32"},
        "checkpoint": {"dir": str(work / "ckpt"), "save_interval": 0, "keep_last": 1, "resume": "never"},
        # the timing hook (eval_fn) runs after every step; the built-in teacher-scored eval stays off
        "eval": {"interval": 1, "teacher_scored": False},
        "logging": {"tensorboard": False, "progress_bar": False, "log_interval": 10**6},
    }
    base.pop("teachers", None)
    merged = deep_merge(base, over)
    if teachers == 1:  # replaced, not merged: the branch maps must name only ``general``
        merged["scheduler"].update(mode="mixed", mixed_shares={"general": 1.0})
        merged["selection"].update(enabled=False, scale_only_selected=False, rho={"general": 1.0},
                                   score={"general": "abs"})
        merged["loss"]["adv_scale"] = {"general": 1.0}
    merged["selection"]["student_logprobs"] = student_logprobs
    return merged


# ---------------------------------------------------------------------------------- a run
def _vm_kb(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


class _LoopClock:
    """The trainer's ``eval_fn``: stamps the loop start (step 0) and each step's end, reads VmHWM.

    ``probe``: called right after each stamp (before step 1 and after every step), its results kept in
    ``probes`` (:func:`output_matmul_rate`, for :func:`paired_floor`). Its time is left out of the loop's wall
    time (:meth:`loop_wall_s`), and so is its memory: the peak is read before each probe and the kernel's
    high-water mark reset after it (``/proc/self/clear_refs``), so ``hwm_kb`` is the steps' own peak (None
    where the mark cannot be reset)."""

    def __init__(self, probe: Optional[Callable[[], Any]] = None) -> None:
        self.stamps: list[float] = []
        self.hwm_kb: Optional[int] = 0
        self.probe = probe
        self.probes: list[Any] = []
        self.probe_s: list[float] = []

    def __call__(self, step: int, model: Any, pgc: Any) -> dict[str, float]:
        self.stamps.append(time.perf_counter())
        if self.hwm_kb is not None:
            self.hwm_kb = max(self.hwm_kb, _vm_kb("VmHWM"))
        if self.probe is None:
            return {}
        t = time.perf_counter()
        self.probes.append(self.probe())
        self.probe_s.append(time.perf_counter() - t)
        if self.hwm_kb is not None and not _reset_hwm():
            self.hwm_kb = None
        return {}

    def loop_wall_s(self) -> Optional[float]:
        """First stamp to last, less the probes between them (None before two stamps)."""
        if len(self.stamps) < 2:
            return None
        return self.stamps[-1] - self.stamps[0] - sum(self.probe_s[:len(self.stamps) - 1])


def _reset_hwm() -> bool:
    """Resets this process's VmHWM to its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_trainer(cfg_dict: dict[str, Any], probe: Optional[Callable[[], Any]] = None) -> dict[str, Any]:
    """Run ``train`` on this process's world (1, or the torchrun world); returns the raw record. ``probe``: see
    :class:`_LoopClock` (its results under ``"probes"``)."""
    from camopd_megatron.config import config_from_dict
    from camopd_megatron.trainer import train

    cfg = config_from_dict(cfg_dict)
    clock = _LoopClock(probe)
    res = train(cfg, eval_fn=clock)
    hwm_kb = clock.hwm_kb if res.role == "student" else _vm_kb("VmHWM")
    return {"role": res.role, "history": [h for h in res.history if "time/step" in h],
            "loop_wall_s": clock.loop_wall_s(), "probes": clock.probes, "hwm_kb": hwm_kb}


def steady_steps(hist: list[dict[str, float]]) -> list[dict[str, float]]:
    """The steps after the first (which pays the warm-up); the one step of a one-step run."""
    return hist[1:] if len(hist) > 1 else hist


def summarize(raw: dict[str, Any], *, size: str, teachers: int, layout: str, threads: int,
              hwm_total_kb: Optional[float] = None, params: Optional[int] = None) -> dict[str, Any]:
    """The peer's fields (and our per-stage breakdown) from one run's history."""
    hist = raw["history"]
    if not hist:
        raise RuntimeError("the trainer ran no steps; check --steps")
    wall = raw["loop_wall_s"] if raw["loop_wall_s"] is not None else sum(h["time/step"] for h in hist)
    hwm_kb = hwm_total_kb if hwm_total_kb is not None else raw["hwm_kb"]
    steady = steady_steps(hist)
    tok_step = [h["throughput/train_tokens_per_s"] * h["time/step"] for h in hist]
    gen_tok = [h["rollout/response_len_mean"] * h["rollout/samples"] for h in hist]
    gen_s = sum(h.get("time/rollout", 0.0) for h in hist)
    train_tokens = round(sum(tok_step))
    return {
        "peer": "camopd_megatron", "size": size, "teachers": teachers, "layout": layout, "threads": threads,
        "params": params, "steps": len(hist), "wall_s": round(wall, 3),
        "step_s_first": round(hist[0]["time/step"], 3),
        "step_s_steady_mean": round(statistics.mean(h["time/step"] for h in steady), 3),
        "gen_s": round(gen_s, 3), "gen_frac": round(gen_s / wall, 3) if wall else None,
        "generated_tokens": round(sum(gen_tok)), "train_tokens": train_tokens,
        "gen_tokens_per_s": round(sum(gen_tok) / gen_s, 1) if gen_s else None,
        "train_tokens_per_s": round(train_tokens / wall, 1),
        "train_tokens_per_s_steady": round(sum(tok_step[1:] or tok_step) / sum(h["time/step"] for h in steady), 1),
        "train_tokens_per_s_excl_gen": round(train_tokens / max(wall - gen_s, 1e-9), 1),
        "response_len_mean": round(statistics.mean(h["rollout/response_len_mean"] for h in hist), 2),
        "loss_first": hist[0].get("train/loss"), "loss_last": hist[-1].get("train/loss"),
        "peak_rss_mb": round(hwm_kb / 1024.0, 1) if hwm_kb is not None else None,
        "stages_s": _stage_means(steady, "time/"),
        "stages_cpu_s": _stage_means(steady, "cpu_time/"),
    }


def _stage_means(steps: list[dict[str, float]], prefix: str) -> dict[str, float]:
    """Each ``prefix`` metric's mean over ``steps`` (0 in a step without it), keyed by the stage's name."""
    keys = sorted({k for h in steps for k in h if k.startswith(prefix)})
    return {k.removeprefix(prefix): round(statistics.mean(h.get(k, 0.0) for h in steps), 4) for k in keys}


def _student_model(cfg_dict: dict[str, Any]) -> Any:
    """The student's :class:`~camopd_megatron.config.ModelConfig` of a benchmark config dict."""
    from camopd_megatron.config import ModelConfig

    fields = {k: v for k, v in cfg_dict["model"].items() if k in ModelConfig.__dataclass_fields__}
    return ModelConfig(**{**fields, "init": "random"})


def _count_params(cfg_dict: dict[str, Any]) -> int:
    """Parameters of one (full, TP=1) student (the planner's count; all experts of an MoE student)."""
    from camopd_megatron.planner import count_params

    return count_params(_student_model(cfg_dict))


def train_stage_flops(cfg_dict: dict[str, Any]) -> dict[str, float]:
    """Matmul FLOPs of one step's train stage (forward + backward of the student, TP = 1), by part.

    Forward, per row of T = prompt + response positions: every layer's linear products (2 FLOPs per weight
    per position: QKV, projection, SwiGLU fc1 (2 × FFN), fc2) and its attention products (QKᵀ and AV over
    the full T × T scores, as the training forward computes them); the output layer over the response
    window only (the scored positions, 2·V·H per position, ``ops/fused_output.py``), as the planner counts
    them (``planner.counts.forward_flops``; an MoE student's top-k experts). Backward is twice the
    forward (dL/dinput and dL/dweight of every product). Elementwise work (norms, softmax, RoPE, the
    optimizer) is not counted: the floor is what the matmuls alone would take.
    """
    from camopd_megatron.planner.counts import forward_flops

    m, r = _student_model(cfg_dict), cfg_dict["rollout"]
    rows, new = r["prompts_per_step"], r["max_new_tokens"]
    t = cfg_dict["data"]["max_prompt_tokens"] + new
    fwd_layers = rows * forward_flops(m, t, 0)  # the planner's count (active experts of an MoE student)
    fwd_output = rows * forward_flops(m, t, new) - fwd_layers
    return {"layers": 3.0 * fwd_layers, "output_layer": 3.0 * fwd_output, "total": 3.0 * (fwd_layers + fwd_output)}


def matmul_flops_per_s(rows: int, hidden: int, vocab: int, reps: int = 3,
                       clocks: Sequence[Callable[[], float]] = (time.perf_counter,)) -> list[float]:
    """This machine's fp32 matmul rate on the output layer's forward product ([rows, H] × [H, V]), FLOP/s, on
    each of ``clocks`` (wall; ``time.thread_time``: per second of this thread's CPU time): the best of ``reps``
    timed calls after a warm-up (the least disturbed by other load), at the threads set."""
    return matmul_rates(rows, hidden, vocab, reps, pick=min, clocks=clocks)


def output_matmul_rate(cfg_dict: dict[str, Any],
                       clocks: Sequence[Callable[[], float]] = (time.perf_counter,)) -> list[float]:
    """:func:`matmul_flops_per_s` on the output layer's product of a benchmark config (FLOP/s per clock)."""
    m, r = cfg_dict["model"], cfg_dict["rollout"]
    return matmul_flops_per_s(r["prompts_per_step"] * r["max_new_tokens"], m["hidden_size"], m["vocab_size"],
                              clocks=clocks)


def _over_floor(flops: float, step_s: Sequence[float], rates: Sequence[float]) -> dict[str, Any]:
    """The floor at the best of ``rates``, and the steps' train / floor: their mean, and min / median / max."""
    rate = max(rates)
    floor_s = flops / rate
    return {"matmul_gflops": round(rate / 1e9, 1), "train_floor_s": round(floor_s, 4),
            **_ratio_summary([t / floor_s for t in step_s])}


def _ratio_summary(ratios: Sequence[float]) -> dict[str, Any]:
    """The steps' train / floor: their mean, and min / median / max (None without steps)."""
    srt = sorted(ratios)
    return {"train_over_floor": round(statistics.mean(srt), 3) if srt else None,
            "train_over_floor_steps": ([round(srt[0], 3), round(statistics.median(srt), 3), round(srt[-1], 3)]
                                       if srt else None)}


def train_floor(cfg_dict: dict[str, Any], step_train_s: Sequence[float], rates: list[float],
                cpu: Optional[tuple[Sequence[float], list[float]]] = None) -> dict[str, Any]:
    """The train stage's FLOP floor at this machine's matmul rate, beside the measured stage: ``step_train_s``,
    each steady step's train stage (their mean, and the spread of train / floor from step to step: min, median,
    max). ``rates``: :func:`output_matmul_rate` measured before and after the loop; the best is used (the floor
    is then the lowest, and train / floor the least flattering, when other load comes and goes).

    ``cpu``: the same steps' train stages and the same rates on the stage thread's CPU clock (one thread
    only), under ``"cpu"``. On a virtual machine the wall clock also counts the time the hypervisor gave the
    core to another guest, which the thread's CPU clock leaves out, in the stage and in the floor alike;
    ``cpu.off_core_s`` is the steps' mean wall − CPU time of the stage."""
    flops = train_stage_flops(cfg_dict)
    out = {"train_gflop": round(flops["total"] / 1e9, 2), "output_layer_gflop": round(flops["output_layer"] / 1e9, 2),
           **_over_floor(flops["total"], step_train_s, rates)}
    if cpu is not None:
        cpu_s, cpu_rates = cpu
        if len(cpu_s) != len(step_train_s):
            raise ValueError(f"train_floor: {len(cpu_s)} CPU times for {len(step_train_s)} steps")
        off = [w - c for w, c in zip(step_train_s, cpu_s)]
        out["cpu"] = {**_over_floor(flops["total"], cpu_s, cpu_rates),
                      "off_core_s": round(statistics.mean(off), 4) if off else None}
    return out


def paired_floor(cfg_dict: dict[str, Any], step_train_s: Sequence[float],
                 rates_around: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Each step's train / floor at the matmul rate measured right around that step: ``rates_around``, per step
    of ``step_train_s``, the rates (:func:`output_matmul_rate`, one clock) probed just before and just after
    it; the better of the two sets the step's floor. A host whose speed drifts during a run (other guests'
    load) then slows the stage and its floor together, where :func:`train_floor`'s one rate for the whole run
    (the best probe before or after the loop) pairs a slow stretch with a fast probe."""
    if len(rates_around) != len(step_train_s):
        raise ValueError(f"paired_floor: {len(rates_around)} probe pairs for {len(step_train_s)} steps")
    flops = train_stage_flops(cfg_dict)["total"]
    rates = [max(pair) for pair in rates_around]
    return {**_ratio_summary([t * r / flops for t, r in zip(step_train_s, rates)]),
            "matmul_gflops_steps": [round(r / 1e9, 1) for r in rates]}


def _paired_floors(cfg_dict: dict[str, Any], hist: list[dict[str, float]], steps: list[int],
                   probes: list[list[float]], threads: int) -> dict[str, Any]:
    """:func:`paired_floor` of the steps at indices ``steps`` of ``hist``, from ``probes`` (one before step 1 and
    one after every step; on the wall clock, and at one thread also the CPU clock: under ``"cpu"``)."""
    if len(probes) != len(hist) + 1:
        raise RuntimeError(f"probe_each_step: {len(probes)} probes for {len(hist)} steps; expected one before the "
                           "first step and one after each")

    def around(clock: int) -> list[tuple[float, float]]:
        return [(probes[i][clock], probes[i + 1][clock]) for i in steps]

    out = paired_floor(cfg_dict, [hist[i]["time/train"] for i in steps], around(0))
    if threads == 1:
        out["cpu"] = paired_floor(cfg_dict, [hist[i]["cpu_time/train"] for i in steps], around(1))
    return out


# ---------------------------------------------------------------------------------- launchers
def _worker_main(cfg_path: str, out_dir: str, threads: int) -> None:
    """One torchrun rank: run the trainer, write ``rank<r>.json``."""
    import torch

    torch.set_num_threads(threads)
    cfg_dict = json.loads(Path(cfg_path).read_text(encoding="utf-8"))
    raw = run_trainer(cfg_dict)
    rank = int(os.environ.get("RANK", "0"))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(raw), encoding="utf-8")


def run_setting(*, size: str, teachers: int, layout: str, steps: int, threads: int,
                work: Optional[Path] = None, dims: Optional[dict[str, int]] = None,
                new_tokens: Optional[int] = None, student_logprobs: str = "recompute",
                rollout_micro_batch: Optional[int] = None, overlap_teachers: bool = True,
                teacher_block: Optional[int] = None, moe_experts: int = 0, moe_topk: int = 2,
                probe_each_step: bool = False) -> dict[str, Any]:
    """Run one benchmark setting and return the summary record.

    ``single`` runs in this process (set ``OMP_NUM_THREADS`` before torch is imported; the CLI
    does); ``sep2`` / ``sep4`` launch torchrun with ``threads`` torch threads per rank.
    ``probe_each_step`` (``single`` only): also probe the matmul rate before step 1 and after every step
    (outside the timed loop and its peak memory), for ``floor.paired`` (:func:`paired_floor`).
    """
    if probe_each_step and layout != "single":
        raise ValueError(f"probe_each_step: the per-step floor is measured in one process; got layout={layout!r} "
                         "(use layout='single', or leave probe_each_step off)")
    own_tmp = work is None
    tmp = tempfile.TemporaryDirectory(prefix="camopd_bench_") if own_tmp else None
    work = Path(tmp.name) if tmp is not None else Path(work)
    try:
        cfg_dict = bench_config_dict(work, size=size, teachers=teachers, layout=layout, steps=steps, dims=dims,
                                     new_tokens=new_tokens, student_logprobs=student_logprobs,
                                     rollout_micro_batch=rollout_micro_batch, overlap_teachers=overlap_teachers,
                                     teacher_block=teacher_block, moe_experts=moe_experts, moe_topk=moe_topk)
        setting = {"student_logprobs": student_logprobs, "rollout_micro_batch": cfg_dict["rollout"]["micro_batch_size"],
                   **({"moe": f"{moe_experts} experts, top-{moe_topk}"} if moe_experts else {}),
                   "overlap_teachers": overlap_teachers,
                   "teacher_block": cfg_dict["rollout"].get("teacher_block_positions"),
                   **({"probe_each_step": True} if probe_each_step else {})}
        params = _count_params(cfg_dict)
        if layout == "single":
            import torch

            torch.set_num_threads(threads)
            # same process, same threads, outside the timed loop; the CPU clock counts one thread's work only
            clocks = (time.perf_counter, time.thread_time) if threads == 1 else (time.perf_counter,)
            before = output_matmul_rate(cfg_dict, clocks)
            raw = run_trainer(cfg_dict, (lambda: output_matmul_rate(cfg_dict, clocks)) if probe_each_step else None)
            rec = summarize(raw, size=size, teachers=teachers, layout=layout, threads=threads, params=params)
            after = output_matmul_rate(cfg_dict, clocks)
            hist = raw["history"]
            steady = [i for i in steady_steps(list(range(len(hist)))) if "time/train" in hist[i]]
            floor = train_floor(cfg_dict, [hist[i]["time/train"] for i in steady], [before[0], after[0]],
                                cpu=([hist[i]["cpu_time/train"] for i in steady], [before[1], after[1]])
                                if threads == 1 else None)
            if probe_each_step:
                floor["paired"] = _paired_floors(cfg_dict, hist, steady, raw["probes"], threads)
            return {**rec, **setting, "floor": floor}
        cfg_path = work / "config.json"
        cfg_path.write_text(json.dumps(cfg_dict), encoding="utf-8")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        world = LAYOUTS[layout]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               "-m", "camopd_megatron.bench.step", "--worker", str(cfg_path), "--out-dir", str(work),
               "--threads", str(threads)]
        subprocess.run(cmd, env=env, check=True, cwd=str(REPO), stdout=subprocess.DEVNULL)
        ranks = [json.loads((work / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(world)]
        total_kb = float(sum(r["hwm_kb"] for r in ranks))
        rec = summarize(ranks[0], size=size, teachers=teachers, layout=layout, threads=threads,
                        hwm_total_kb=total_kb, params=params)
        return {**rec, **setting}
    finally:
        if tmp is not None:
            tmp.cleanup()


def format_record(r: dict[str, Any]) -> str:
    """A human-readable block for one summary record."""
    stages = " ".join(f"{k} {v:.3f}" for k, v in r["stages_s"].items() if k != "step")
    return (f"{r['size']} teachers={r['teachers']} layout={r['layout']} threads={r['threads']} params={r['params']} "
            f"rollout_micro_batch={r.get('rollout_micro_batch')} overlap_teachers={r.get('overlap_teachers')}"
            + (f" teacher_block={r['teacher_block']}" if r.get("teacher_block") is not None else "")
            + (f" moe={r['moe']}" if r.get("moe") else "") + "\n"
            f"  steps {r['steps']}  wall {r['wall_s']:.2f}s  s/step first {r['step_s_first']:.3f} "
            f"steady {r['step_s_steady_mean']:.3f}\n"
            f"  gen tok/s {r['gen_tokens_per_s']}  train tok/s (e2e) {r['train_tokens_per_s']} "
            f"(steady {r['train_tokens_per_s_steady']})  peak RSS {r['peak_rss_mb']} MB\n"
            f"  steady stage means (s): {stages}"
            + (f"\n  train stage FLOP floor {r['floor']['train_floor_s']:.3f}s ({r['floor']['train_gflop']} GFLOP at the "
               f"measured {r['floor']['matmul_gflops']} GFLOP/s): train / floor {r['floor']['train_over_floor']}"
               + (" (steady steps min / median / max {} / {} / {})".format(*r["floor"]["train_over_floor_steps"])
                  if r["floor"].get("train_over_floor_steps") else "")
               + (_format_cpu_floor(r["floor"]["cpu"]) if r["floor"].get("cpu") else "")
               + (_format_paired_floor(r["floor"]["paired"]) if r["floor"].get("paired") else "")
               if r.get("floor") else ""))


def _format_cpu_floor(c: dict[str, Any]) -> str:
    return (f"\n  on the stage thread's CPU clock (off the core {c['off_core_s']:.3f}s a step; floor "
            f"{c['train_floor_s']:.3f}s at {c['matmul_gflops']} GFLOP/s): train / floor {c['train_over_floor']}"
            + (" (min / median / max {} / {} / {})".format(*c["train_over_floor_steps"])
               if c.get("train_over_floor_steps") else ""))


def _format_paired_floor(p: dict[str, Any]) -> str:
    def line(q: dict[str, Any], clock: str) -> str:
        return (f"\n  each step at the rate probed around it ({clock}; {min(q['matmul_gflops_steps'])}-"
                f"{max(q['matmul_gflops_steps'])} GFLOP/s): train / floor {q['train_over_floor']} (min / median / "
                "max {} / {} / {})".format(*q["train_over_floor_steps"]))
    return line(p, "wall clock") + (line(p["cpu"], "thread CPU clock") if p.get("cpu") else "")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """CLI: run one setting, print the record (``--json``: one JSON line); returns the record."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--teachers", type=int, choices=(1, 2), default=1)
    p.add_argument("--layout", choices=tuple(LAYOUTS), default="single")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=None, help="response length (default: the size's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default 2; sep2, sep4: 1)")
    p.add_argument("--student-logprobs", choices=("recompute", "rollout"), default="recompute",
                   help="selection.student_logprobs (the presets use recompute)")
    p.add_argument("--rollout-micro-batch", type=int, default=None,
                   help="rollout.micro_batch_size (default: the whole batch); 2+ micro-batches let the teachers overlap")
    p.add_argument("--no-overlap-teachers", action="store_true", help="rollout.overlap_teachers: false")
    p.add_argument("--teacher-block", type=int, default=None,
                   help="rollout.teacher_block_positions: positions per block streamed to the teachers "
                        "(default: the config's; 0: each rollout micro-batch whole)")
    p.add_argument("--moe-experts", type=int, default=0,
                   help="an MoE student: experts per layer (0: dense); each FFN/top-k wide, EP = 1")
    p.add_argument("--moe-topk", type=int, default=2, help="experts per token with --moe-experts")
    p.add_argument("--probe-each-step", action="store_true",
                   help="single layout: also probe the matmul rate around every step (outside the timed loop) and "
                        "report each step's train / floor at the rate around it")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the text block")
    p.add_argument("--worker", metavar="CONFIG_JSON", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    threads = a.threads or (2 if a.layout == "single" else 1)
    if a.worker:
        _worker_main(a.worker, a.out_dir, threads)
        return {}
    if a.steps < 1:
        raise ValueError(f"--steps={a.steps} must be >= 1")
    rec = run_setting(size=a.size, teachers=a.teachers, layout=a.layout, steps=a.steps, threads=threads,
                      new_tokens=a.new_tokens, student_logprobs=a.student_logprobs,
                      rollout_micro_batch=a.rollout_micro_batch, overlap_teachers=not a.no_overlap_teachers,
                      teacher_block=a.teacher_block, moe_experts=a.moe_experts, moe_topk=a.moe_topk,
                      probe_each_step=a.probe_each_step)
    print(json.dumps(rec) if a.json else format_record(rec), flush=True)
    return rec


if __name__ == "__main__":
    # thread env before torch is imported (the peer does the same)
    set_thread_env("1" if ("sep4" in sys.argv or "sep2" in sys.argv) else "2")
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read once, at torch's first allocation
    main()
