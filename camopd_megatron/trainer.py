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

Stopping early. SIGTERM and SIGUSR1 only set a flag (a handler must not act in the middle of a
collective), on every rank. After every step (but the last) the whole world agrees on it with one
all-reduce (max of the flags and of ``run.exit_duration_min`` being reached): the student ranks call it
right after telling each separate teacher replica that the step ended (``step``, point-to-point), and
each teacher replica calls it once every student replica routed to it said so. On a stop the student
saves that step's checkpoint (the teachers join the save), shuts the teachers down, and every rank
logs why it stopped, so a signal that reaches any one rank, a teacher's included, stops the run.
"""
from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import psutil
import torch
import torch.distributed as dist

from camopd_megatron.checkpoint.dist import (
    CheckpointError, load_model, load_rank_state, load_sharded, model_sharded_state_dict, save_checkpoint,
)
from camopd_megatron.checkpoint.inputs import INPUTS_SOURCE, resolve_inputs
from camopd_megatron.checkpoint.manager import CheckpointManager
from camopd_megatron.checkpoint.resume import select_checkpoint
from camopd_megatron.config import Config, ConfigError, dump_config
from camopd_megatron.config.errors import report_user_error
from camopd_megatron.data import build_prompt_sources, model_tokenizer
from camopd_megatron.distill.evaluate import eval_prompt_sets, evaluate_branches
from camopd_megatron.distill.probe import probe_branch_conflict, probe_coherence
from camopd_megatron.distill.scheduler import BranchScheduler, StepPlan
from camopd_megatron.distill.step import StepOutput, StudentState, camopd_step, settings_from_config
from camopd_megatron.teachers import TeacherClient, TeacherHost, build_teachers
from camopd_megatron.distributed import DistEnv, destroy_distributed, init_distributed
from camopd_megatron.models.gpt import build_gpt_model, finish_param_gather, init_model_rng, recompute_kwargs, unwrap_model
from camopd_megatron.models.optimizer import BranchMoments, build_ddp_and_optimizer
from camopd_megatron.models.optimizer_state import (
    branch_state_mismatch, branch_state_record, load_optimizer_state, optimizer_sharded_state_dict,
)
from camopd_megatron.models.pipeline import wire_device
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
    stopped: Optional[str] = None
    """Why the run stopped before ``run.steps`` ("SIGTERM", "SIGUSR1", "run.exit_duration_min"), else None."""


class _TeacherFailure(RuntimeError):
    """Too many steps with non-finite teacher log-probs."""


class _StopRequest:
    """SIGTERM / SIGUSR1 → a flag read between steps (the previous handlers come back on :meth:`restore`)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, exit_duration_min: Optional[float] = None) -> None:
        self.signum = 0
        self.exit_duration_min = exit_duration_min
        self.started = time.monotonic()
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def agree(self) -> Optional[str]:
        """Whether to stop now: one all-reduce (max) over the whole world, so every rank of every role
        agrees. Every rank calls it once per step (teacher ranks through ``TeacherHost.serve``'s ``on_step``)."""
        limit = self.exit_duration_min
        late = limit is not None and time.monotonic() - self.started >= 60.0 * limit
        flags = torch.tensor([float(self.signum), float(late)], device=wire_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # the world group
        if flags[0] > 0:
            return signal.Signals(int(flags[0])).name
        return "run.exit_duration_min" if flags[1] > 0 else None

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def _inputs_agreed(problem: Optional[BaseException], env: DistEnv) -> None:
    """Every rank has checked its inputs before any rank stops: one that exited first would have torchrun kill
    the others before they print their own problems. Raises this rank's problem; on a rank whose inputs were
    fine while others' were not, a ConfigError naming those ranks (a path missing on one node only)."""
    if env.world_size == 1:  # nobody to wait for: the CLI reports it
        if problem is not None:
            raise problem
        return
    if isinstance(problem, ConfigError):
        report_user_error(problem)  # on screen before this rank waits, so before any rank can exit
    bad = torch.zeros(env.world_size, device=env.device)
    bad[env.rank] = float(problem is not None)
    dist.all_reduce(bad)
    if problem is not None:
        raise problem
    ranks = bad.nonzero().flatten().tolist()
    if ranks:
        raise ConfigError([f"rank(s) {ranks} found problems in their inputs (their own lines say which); this "
                           f"rank's inputs are fine"], source=INPUTS_SOURCE)


def train(cfg: Config, *, eval_fn: Optional[EvalFn] = None, on_step: Optional[StepFn] = None) -> TrainResult:
    """Run CaMOPD training for ``cfg`` on this process (under torchrun, or alone as a world of 1)."""
    owns_world = not dist.is_initialized()  # a caller that set up the world keeps it afterwards
    env = init_distributed(backend=cfg.parallel.backend, timeout_s=cfg.parallel.timeout_s)
    stop = _StopRequest(cfg.run.exit_duration_min)
    try:
        setup_logging(env.rank, cfg.run.log_level.upper())
        try:  # every rank, before any model: paths, manifests, tokenizer; architectures
            cfg, problem = resolve_inputs(cfg), None
        except Exception as e:  # raised again below, once every rank has checked its own
            problem = e
        _inputs_agreed(problem, env)
        layout = RoleLayout.from_config(cfg, env.world_size)
        if env.rank == 0:
            logger.info("rank map:\n%s", layout.rank_map())
        groups = build_process_groups(layout, env.rank, timeout_s=cfg.parallel.timeout_s)
        client, host = build_teachers(cfg, layout, groups)
        if host is not None:
            return _serve_teacher(host, stop)
        try:
            result = _Trainer(cfg, groups, client, eval_fn, stop, on_step).run()
        except BaseException as e:
            client.close(error=e)  # teachers stop with the student's error instead of waiting
            raise
        client.close()
        return result
    finally:
        stop.restore()
        if owns_world:
            destroy_distributed()


def _serve_teacher(host: TeacherHost, stop: _StopRequest) -> TrainResult:
    """Teacher ranks: serve log-prob requests (and join checkpoint saves and the per-step stop
    agreement) until the student is done."""
    stats = host.serve(on_step=lambda step: stop.agree())
    if stats.stopped:
        logger.warning("role %s rank %d: stopping after step %d (%s); the student saved that step, exiting",
                       host.role.name, dist.get_rank(), stats.last_step, stats.stopped)
    return TrainResult(role=host.role.name, steps_done=stats.last_step, stopped=stats.stopped)


class _Trainer:
    """Student-side state and loop (built on every student rank)."""

    def __init__(self, cfg: Config, groups: RankGroups, teachers: TeacherClient, eval_fn: Optional[EvalFn],
                 stop: _StopRequest, on_step: Optional[StepFn] = None) -> None:
        self.cfg, self.groups, self.teachers, self.eval_fn, self.stop = cfg, groups, teachers, eval_fn, stop
        self.on_step = on_step
        self.pgc = groups.pg_collection
        self.rank = dist.get_rank()
        self.is_logger = self.rank == 0
        device_type, capability = detect_device()
        prec = precision_kwargs(cfg.precision, cfg.model, device_type=device_type, te_available=te_available(),
                                compute_capability=capability)
        init_model_rng(cfg.run.seed, self.pgc)
        model = build_gpt_model(cfg.model, self.pgc, params_dtype=prec["params_dtype"],
                                sequence_parallel=cfg.parallel.sequence_parallel,
                                config_extra={**prec, **recompute_kwargs(cfg.model)})
        if cfg.model.checkpoint:
            load_model(model, cfg.model.checkpoint, model_cfg=cfg.model, pg_collection=self.pgc)
        ddp_chunks, optimizer, lr_scheduler = build_ddp_and_optimizer(
            [model], cfg.optim, cfg.parallel, self.pgc, total_steps=cfg.run.steps)
        self.student = StudentState(
            ddp_model=ddp_chunks[0], ddp_chunks=ddp_chunks, optimizer=optimizer, lr_scheduler=lr_scheduler,
            pg_collection=self.pgc, role_group=groups.role_group, vocab_size=cfg.model.vocab_size,
            max_seq_len=cfg.model.seq_length,
            moments=(BranchMoments(optimizer, cfg.scheduler.branches) if cfg.optim.branch_state == "per_branch"
                     else None),
        )
        self.tokenizer = model_tokenizer(cfg.data.tokenizer, cfg.model.vocab_size)
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
        self.coherence_sources = (  # a stream of its own: the coherence probe never shifts the others
            build_prompt_sources(cfg.data, cfg.scheduler.branches, self.tokenizer, cfg.run.seed + 2)
            if cfg.logging.diagnostics_interval and cfg.logging.coherence_samples else None
        )
        out = Path(cfg.run.output_dir)
        self.ckpt = CheckpointManager(cfg.checkpoint.dir or out / "checkpoints", cfg.checkpoint.keep_last)
        self.writer = make_writer(cfg.logging.tensorboard, str(cfg.logging.dir or out / "tensorboard"), self.is_logger)
        if self.is_logger:
            out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, str(out / "config.yaml"))
        self.bad_teacher_steps = 0
        self.clip_counts = [0, 0]  # [steps whose gradient was clipped, steps that reached the optimizer] (grad_clip_rate)

    # -------------------------------------------------------------------------------- checkpoints
    def _params_ready(self) -> None:
        """Finish the last optimizer step's pending parameter all-gathers (``parallel.overlap_param_gather``)
        before code that reads the weights directly (save, evaluation, probe), on every student rank."""
        finish_param_gather(self.student.ddp_model)

    def _state(self, is_loading: bool) -> dict[str, Any]:
        # the bare model's keys (no DDP "module." prefix): a training checkpoint then loads anywhere a
        # model checkpoint does (teachers, HF export); the optimizer maps its state by parameter identity
        msd = model_sharded_state_dict(unwrap_model(self.student.ddp_model), self.pgc)
        return {"model": msd, "optimizer": optimizer_sharded_state_dict(
            self.student.optimizer, msd, is_loading=is_loading, pg_collection=self.pgc, moments=self.student.moments)}

    def save(self, step: int) -> str:
        """World-collective save of the state after ``step`` steps (atomic; keeps the last N)."""
        path = self.ckpt.path_for(step)
        self._params_ready()
        if self.teachers.has_separate:  # teacher ranks take part in the world-collective save
            self.teachers.join_save(str(path.absolute()), step)
        common = {
            "scheduler": self.scheduler.state_dict(),
            "lr_scheduler": self.student.lr_scheduler.state_dict(),
            "data": {b: s.state_dict() for b, s in self.sources.items()},
            "bad_teacher_steps": self.bad_teacher_steps,
            "clip_counts": list(self.clip_counts),
            "optim_branch_state": branch_state_record(self.student.moments),
        }
        save_checkpoint(path, self._state(False), model_cfg=self.cfg.model, step=step, common=common,
                        rank_state={"cpu_rng": torch.get_rng_state()}, overwrite=True,
                        hf_source=self.cfg.model.checkpoint)  # the starting model's tokenizer, for the HF export
        if self.is_logger:
            self.ckpt.mark_latest(path)
        dist.barrier(group=self.groups.role_group)
        return str(path)

    def resume(self) -> int:
        """Load the checkpoint to resume from (``checkpoint.resume``/``load``, checkpoint/resume.py for
        damaged ones); returns the first step to run."""
        c = self.cfg.checkpoint
        path, manifest = select_checkpoint(self.ckpt, load=c.load, resume=c.resume, group=self.groups.role_group,
                                           is_writer=self.is_logger)
        if path is None:
            return 0
        common = manifest["common"]
        mismatch = branch_state_mismatch(common.get("optim_branch_state"), self.student.moments)
        if mismatch:
            raise CheckpointError(f"checkpoint {str(path)!r}: {mismatch}")
        rs = load_rank_state(path, self.rank)  # checksummed by select_checkpoint; read before the expensive load
        loaded = load_sharded(path, self._state(True), process_group=self.pgc.intra_dist_opt, verify=False)
        unwrap_model(self.student.ddp_model).load_state_dict(loaded["model"], strict=False)
        load_optimizer_state(self.student.optimizer, loaded["optimizer"], self.student.moments)
        self.scheduler.load_state_dict(common["scheduler"])
        self.student.lr_scheduler.load_state_dict(common["lr_scheduler"])
        for b, s in self.sources.items():
            s.load_state_dict(common["data"][b])
        self.bad_teacher_steps = int(common.get("bad_teacher_steps", 0))
        self.clip_counts = [int(v) for v in common.get("clip_counts", [0, 0])]
        if rs is not None:
            torch.set_rng_state(rs["cpu_rng"])
        logger.info("resumed from %s (step %d)", path, manifest["step"])
        return int(manifest["step"])

    # -------------------------------------------------------------------------------- loop
    def _evaluate(self, step: int) -> dict[str, float]:
        """Built-in teacher-scored eval (``eval.teacher_scored``) and the caller's ``eval_fn``."""
        out: dict[str, float] = {}
        self._params_ready()
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
            probe = self._probe(step, plan)
            out = camopd_step(step, plan, self.student, self.teachers, self.sources, self.settings)
            self._handle_skip(out)
            if self.on_step is not None:
                self.on_step(out)
            metrics = {"step": float(step + 1), **out.metrics, **probe}
            if "grad_clipped" in metrics:  # the running fraction of updates whose gradient was clipped
                self.clip_counts = [self.clip_counts[0] + int(metrics["grad_clipped"]), self.clip_counts[1] + 1]
                metrics["grad_clip_rate"] = self.clip_counts[0] / self.clip_counts[1]
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
            stop = self._stop_reason(done) if done < cfg.run.steps else None  # the last step ends the run anyway
            if (interval and done % interval == 0) or done == cfg.run.steps or stop:
                result.last_checkpoint = self.save(done)
            result.steps_done = done
            if stop:
                result.stopped = stop
                logger.warning("rank %d: stopping after step %d of %d (%s); saved %s, run the same command to "
                               "resume from it", self.rank, done, cfg.run.steps, stop, result.last_checkpoint)
                break
        if bar is not None:
            bar.close()
        self.writer.close()
        return result

    def _stop_reason(self, done: int) -> Optional[str]:
        """Whether to stop after this step (``done`` steps): the separate teachers are told the step
        ended, then the world-wide agreement (:meth:`_StopRequest.agree`)."""
        if self.teachers.has_separate:
            self.teachers.step_end(done)
        return self.stop.agree()

    def _probe(self, step: int, plan: StepPlan) -> dict[str, float]:
        """The general/domain gradient-conflict probe and the gradient-coherence probe of the step's
        branches, every ``logging.diagnostics_interval`` steps (before the update)."""
        every, log = self.cfg.logging.diagnostics_interval, self.cfg.logging
        if not every or step % every:
            return {}
        self._params_ready()
        out: dict[str, float] = {}
        if self.probe_sources is not None:
            out.update(probe_branch_conflict(step, self.probe_branches, log.diagnostics_prompts, self.student,
                                             self.teachers, self.probe_sources, self.settings))
        if self.coherence_sources is not None:
            out.update(probe_coherence(step, plan.branches, log.coherence_samples, self.student, self.teachers,
                                       self.coherence_sources, self.settings))
        return out

    def _handle_skip(self, out: StepOutput) -> None:
        if "teacher_nonfinite_tokens" not in out.metrics:
            return
        self.scheduler.repeat_last()  # the skipped step's branch gets its turn again (docs/algorithm.md §6)
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
