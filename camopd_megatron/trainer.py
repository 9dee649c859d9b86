"""The training loop: roles, schedule, checkpoints, metrics, evaluation. One step lives in distill/step.py.

    train(cfg)
      ├─ init the world; plan the role layout; build per-role process groups
      ├─ teacher ranks: host their teacher(s) and serve log-prob requests until the student is done
      └─ student ranks: build the model (+ DDP, optimizer, lr schedule), prompt sources, scheduler;
         resume from the latest checkpoint; then for each step:
             camopd_step → metrics (TensorBoard, progress bar) → checkpoint every save_interval
             → evaluation hook every eval.interval

Checkpoints are world-collective (megatron's dist_checkpointing synchronises through global rank
0): the student asks every teacher group to join each save (they pass an empty state). A checkpoint
holds the model, the optimizer, and in its manifest the scheduler, lr schedule and data positions;
per-rank RNG states go to ``ranks/<rank>.pt``. Resuming reproduces the uninterrupted run exactly on
CPU (rollout randomness is a function of (seed, step, sample id), not of process state).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import psutil
import torch
import torch.distributed as dist

from camopd_megatron.checkpoint.dist import (
    CheckpointError, load_model, load_rank_state, load_sharded, model_sharded_state_dict, read_manifest, save_checkpoint,
)
from camopd_megatron.checkpoint.hf_side import carry_hf_files
from camopd_megatron.checkpoint.manager import CheckpointManager
from camopd_megatron.config import Config, dump_config
from camopd_megatron.data import build_prompt_sources, check_vocab, load_tokenizer
from camopd_megatron.distill.evaluate import eval_prompt_sets, evaluate_branches
from camopd_megatron.distill.probe import probe_branch_conflict
from camopd_megatron.distill.scheduler import BranchScheduler
from camopd_megatron.distill.step import StepOutput, StudentState, camopd_step, settings_from_config
from camopd_megatron.teachers import TeacherClient, TeacherHost, build_teachers
from camopd_megatron.distributed import destroy_distributed, init_distributed
from camopd_megatron.models.gpt import build_gpt_model, init_model_rng, unwrap_model
from camopd_megatron.models.optimizer import build_ddp_and_optimizer, optimizer_sharded_state_dict
from camopd_megatron.models.precision import detect_device, precision_kwargs
from camopd_megatron.deps import te_available
from camopd_megatron.parallel import RankGroups, RoleLayout, build_process_groups
from camopd_megatron.utils.logging import setup_logging
from camopd_megatron.utils.metrics import make_writer

logger = logging.getLogger(__name__)

EvalFn = Callable[[int, Any, Any], dict[str, float]]
"""``eval_fn(step, model, pg_collection) -> metrics``: called on every student rank (collectively)."""
StepFn = Callable[[StepOutput], None]
"""``on_step(out)``: called on every student rank after each step, with its metrics and
``out.record`` (the rows, μ, teacher log-probs and selection this rank trained on)."""


@dataclass
class TrainResult:
    """What :func:`train` returns on each rank."""

    role: str
    steps_done: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    """Per-step metrics (student ranks; identical on each), including eval metrics at eval steps."""
    last_checkpoint: Optional[str] = None


class _TeacherFailure(RuntimeError):
    """Too many steps with non-finite teacher log-probs."""


def train(cfg: Config, *, eval_fn: Optional[EvalFn] = None, on_step: Optional[StepFn] = None) -> TrainResult:
    """Run CaMOPD training for ``cfg`` on this process (under torchrun, or alone as a world of 1)."""
    owns_world = not dist.is_initialized()  # a caller that set up the world keeps it afterwards
    env = init_distributed(backend=cfg.parallel.backend, timeout_s=cfg.parallel.timeout_s)
    try:
        setup_logging(env.rank, cfg.run.log_level.upper())
        layout = RoleLayout.from_config(cfg, env.world_size)
        if env.rank == 0:
            logger.info("rank map:\n%s", layout.rank_map())
        groups = build_process_groups(layout, env.rank, timeout_s=cfg.parallel.timeout_s)
        client, host = build_teachers(cfg, layout, groups)
        if host is not None:
            return _serve_teacher(host)
        try:
            result = _Trainer(cfg, groups, client, eval_fn, on_step).run()
        except BaseException as e:
            client.close(error=e)  # teachers stop with the student's error instead of waiting
            raise
        client.close()
        return result
    finally:
        if owns_world:
            destroy_distributed()


def _serve_teacher(host: TeacherHost) -> TrainResult:
    """Teacher ranks: serve log-prob requests (and join checkpoint saves) until the student is done."""
    host.serve()
    return TrainResult(role=host.role.name)


class _Trainer:
    """Student-side state and loop (built on every student rank)."""

    def __init__(self, cfg: Config, groups: RankGroups, teachers: TeacherClient, eval_fn: Optional[EvalFn],
                 on_step: Optional[StepFn] = None) -> None:
        self.cfg, self.groups, self.teachers, self.eval_fn, self.on_step = cfg, groups, teachers, eval_fn, on_step
        self.pgc = groups.pg_collection
        self.rank = dist.get_rank()
        self.is_logger = self.rank == 0
        device_type, capability = detect_device()
        prec = precision_kwargs(cfg.precision, cfg.model, device_type=device_type, te_available=te_available(),
                                compute_capability=capability)
        init_model_rng(cfg.run.seed, self.pgc)
        model = build_gpt_model(cfg.model, self.pgc, params_dtype=prec["params_dtype"],
                                sequence_parallel=cfg.parallel.sequence_parallel, config_extra=prec)
        if cfg.model.checkpoint:
            load_model(model, cfg.model.checkpoint, model_cfg=cfg.model, pg_collection=self.pgc)
        ddp_chunks, optimizer, lr_scheduler = build_ddp_and_optimizer(
            [model], cfg.optim, cfg.parallel, self.pgc, total_steps=cfg.run.steps)
        self.student = StudentState(
            ddp_model=ddp_chunks[0], ddp_chunks=ddp_chunks, optimizer=optimizer, lr_scheduler=lr_scheduler,
            pg_collection=self.pgc, role_group=groups.role_group, vocab_size=cfg.model.vocab_size,
            max_seq_len=cfg.model.seq_length,
        )
        # no data.tokenizer: the built-in one (ASCII characters, or UTF-8 bytes when the vocabulary allows)
        byte_vocab = cfg.model.vocab_size if cfg.model.vocab_size >= 260 else 128
        self.tokenizer = load_tokenizer(cfg.data.tokenizer, byte_vocab_size=byte_vocab)
        check_vocab(self.tokenizer, cfg.model.vocab_size, cfg.data.tokenizer)
        self.scheduler = BranchScheduler.from_config(cfg)
        self.sources = build_prompt_sources(cfg.data, cfg.scheduler.branches, self.tokenizer, cfg.run.seed)
        self.settings = settings_from_config(cfg, self.tokenizer.eos_id)
        self.eval_prompts = (
            eval_prompt_sets(cfg, cfg.scheduler.branches, self.tokenizer, self.student.dp_rank, self.student.dp_size)
            if cfg.eval.interval and cfg.eval.teacher_scored else None
        )
        self.probe_branches = cfg.scheduler.branches[:2]
        self.probe_sources = (
            build_prompt_sources(cfg.data, self.probe_branches, self.tokenizer, cfg.run.seed + 1)
            if cfg.logging.diagnostics_interval and len(self.probe_branches) == 2 else None
        )
        if cfg.logging.diagnostics_interval and self.probe_sources is None:
            logger.warning("logging.diagnostics_interval is set but the schedule has one branch: no conflict probe")
        out = Path(cfg.run.output_dir)
        self.ckpt = CheckpointManager(cfg.checkpoint.dir or out / "checkpoints", cfg.checkpoint.keep_last)
        self.writer = make_writer(cfg.logging.tensorboard, str(cfg.logging.dir or out / "tensorboard"), self.is_logger)
        if self.is_logger:
            out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, str(out / "config.yaml"))
        self.bad_teacher_steps = 0

    # -------------------------------------------------------------------------------- checkpoints
    def _state(self, is_loading: bool) -> dict[str, Any]:
        # the bare model's keys (no DDP "module." prefix): a training checkpoint then loads anywhere a
        # model checkpoint does (teachers, HF export); the optimizer maps its state by parameter identity
        msd = model_sharded_state_dict(unwrap_model(self.student.ddp_model), self.pgc)
        return {"model": msd, "optimizer": optimizer_sharded_state_dict(
            self.student.optimizer, msd, is_loading=is_loading, pg_collection=self.pgc)}

    def save(self, step: int) -> str:
        """World-collective save of the state after ``step`` steps (atomic; keeps the last N)."""
        path = self.ckpt.path_for(step)
        if self.teachers.has_separate:  # teacher ranks take part in the world-collective save
            self.teachers.join_save(str(path.absolute()), step)
        common = {
            "scheduler": self.scheduler.state_dict(),
            "lr_scheduler": self.student.lr_scheduler.state_dict(),
            "data": {b: s.state_dict() for b, s in self.sources.items()},
            "bad_teacher_steps": self.bad_teacher_steps,
        }
        save_checkpoint(path, self._state(False), model_cfg=self.cfg.model, step=step, common=common,
                        rank_state={"cpu_rng": torch.get_rng_state()}, overwrite=True)
        if self.is_logger:  # the tokenizer and HF side files of the starting model, for the HF export
            carry_hf_files(self.cfg.model.checkpoint, path)
            self.ckpt.mark_latest(path)
        dist.barrier(group=self.groups.role_group)
        return str(path)

    def resume(self) -> int:
        """Load the checkpoint to resume from (``checkpoint.resume``); returns the first step to run."""
        c = self.cfg.checkpoint
        if c.resume == "never" and not c.load:
            return 0
        path = Path(c.load) if c.load else self.ckpt.latest()
        if path is None:
            if c.resume == "must":
                raise CheckpointError(f"checkpoint.resume=must but no checkpoint in {str(self.ckpt.root)!r}; "
                                      "set checkpoint.load or checkpoint.resume=auto")
            return 0
        manifest = read_manifest(path)
        loaded = load_sharded(path, self._state(True), process_group=self.pgc.intra_dist_opt)
        unwrap_model(self.student.ddp_model).load_state_dict(loaded["model"], strict=False)
        self.student.optimizer.load_state_dict(loaded["optimizer"])
        common = manifest["common"]
        self.scheduler.load_state_dict(common["scheduler"])
        self.student.lr_scheduler.load_state_dict(common["lr_scheduler"])
        for b, s in self.sources.items():
            s.load_state_dict(common["data"][b])
        self.bad_teacher_steps = int(common.get("bad_teacher_steps", 0))
        rs = load_rank_state(path, self.rank)
        if rs is not None:
            torch.set_rng_state(rs["cpu_rng"])
        logger.info("resumed from %s (step %d)", path, manifest["step"])
        return int(manifest["step"])

    # -------------------------------------------------------------------------------- loop
    def _evaluate(self, step: int) -> dict[str, float]:
        """Built-in teacher-scored eval (``eval.teacher_scored``) and the caller's ``eval_fn``."""
        out: dict[str, float] = {}
        if self.eval_prompts is not None:
            out.update(evaluate_branches(step, self.eval_prompts, self.student, self.teachers, self.settings,
                                         self.cfg.eval.max_new_tokens or self.cfg.rollout.max_new_tokens))
        if self.eval_fn is not None:
            model = unwrap_model(self.student.ddp_model)
            was = model.training
            model.eval()
            try:
                with torch.no_grad():
                    out.update({f"eval/{k}": float(v) for k, v in self.eval_fn(step, model, self.pgc).items()})
            finally:
                model.train(was)
        return out

    def run(self) -> TrainResult:
        cfg = self.cfg
        start = self.resume()
        result = TrainResult(role="student")
        bar = _progress(start, cfg.run.steps, enabled=self.is_logger and cfg.logging.progress_bar)
        eval_every = cfg.eval.interval
        evaluating = self.eval_fn is not None or self.eval_prompts is not None
        if start == 0 and evaluating:
            result.history.append({"step": 0.0, **self._evaluate(0)})
        for step in range(start, cfg.run.steps):
            plan = self.scheduler.next_plan()
            probe = self._probe(step)
            out = camopd_step(step, plan, self.student, self.teachers, self.sources, self.settings)
            self._handle_skip(out)
            if self.on_step is not None:
                self.on_step(out)
            metrics = {"step": float(step + 1), **out.metrics, **probe}
            metrics["memory/rss_gib"] = psutil.Process().memory_info().rss / 2**30
            if torch.cuda.is_available():
                metrics["memory/gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            done = step + 1
            if evaluating and ((eval_every and done % eval_every == 0) or done == cfg.run.steps):
                metrics.update(self._evaluate(done))
            result.history.append(metrics)
            if done % cfg.logging.log_interval == 0:
                self.writer.scalars(done, metrics)
                _log_line(done, plan, metrics, self.is_logger)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(branch=plan.branch or "mixed", loss=f"{metrics.get('train/loss', 0.0):.4f}")
            interval = cfg.checkpoint.save_interval
            if (interval and done % interval == 0) or done == cfg.run.steps:
                result.last_checkpoint = self.save(done)
            result.steps_done = done
        if bar is not None:
            bar.close()
        self.writer.close()
        return result

    def _probe(self, step: int) -> dict[str, float]:
        """The general/domain gradient-conflict probe, every ``logging.diagnostics_interval`` steps."""
        every = self.cfg.logging.diagnostics_interval
        if self.probe_sources is None or step % every:
            return {}
        return probe_branch_conflict(step, self.probe_branches, self.cfg.logging.diagnostics_prompts, self.student,
                                     self.teachers, self.probe_sources, self.settings)

    def _handle_skip(self, out: StepOutput) -> None:
        if "teacher_nonfinite_tokens" not in out.metrics:
            return
        self.bad_teacher_steps += 1
        limit = self.cfg.loss.max_bad_teacher_steps
        logger.warning("step %d skipped: %d non-finite teacher log-probs (%d/%d allowed)", out.step,
                       int(out.metrics["teacher_nonfinite_tokens"]), self.bad_teacher_steps, limit)
        if self.bad_teacher_steps > limit:
            raise _TeacherFailure(f"teachers returned NaN/inf on {self.bad_teacher_steps} steps "
                                  f"(loss.max_bad_teacher_steps={limit}); check the teacher checkpoints")


def _progress(start: int, total: int, *, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="camopd", unit="step", dynamic_ncols=True)


def _log_line(step: int, plan: Any, m: dict[str, float], enabled: bool) -> None:
    if not enabled:
        return
    logger.info(
        "step %d [%s] loss %.4f kept %.2f gap %s resp %.1f %.2fs (rollout %.2f teacher %.2f train %.2f)",
        step, plan.branch or "mixed", m.get("train/loss", math.nan), m.get("select/kept_fraction", math.nan),
        {k.split("/")[1]: round(v, 3) for k, v in m.items() if k.startswith("gap/") and k.endswith("/mean")},
        m.get("rollout/response_len_mean", 0.0), m.get("time/step", 0.0), m.get("time/rollout", 0.0),
        m.get("time/teacher", 0.0), m.get("time/train", 0.0),
    )
