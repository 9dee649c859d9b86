"""Stage 3 of the demo: CaMOPD vs vanilla MOPD and the ablations from the domain teacher, and the report.

For each method (a preset of ``examples/configs``) and seed, the student starts from the domain
teacher's weights and is trained by :func:`camopd_megatron.trainer.train` with the same step and
prompt budget: general prompts come from the *proxy* pool (narrower than the general teacher's
training data), domain prompts from the domain pool. The evaluation hook
(:class:`~camopd_megatron.demo.probe.DemoEvaluator`) measures held-out graded credit per task (and the
exact-match rate per branch) every ``eval_interval`` steps; the trainer's branch-conflict probe (``logging.diagnostics_interval`` =
``eval_interval``) logs ``diag/grad_cosine``, the cosine of the vanilla general and domain gradients
on fresh probe batches (history entry ``step = s + 1`` holds the probe taken before update ``s``).

The report is a markdown table (per seed the mean of its last evaluations, then mean ± 95% interval over
seeds), the diagnostics (kept fractions, clip rates, probe cosines), the raw histories as JSON, and two
PNGs (scores over steps; kept fraction and gradient cosine over steps). :func:`run_conflict_probe` is the
check that comes first: does vanilla MOPD's general gradient oppose its domain gradient on this testbed?
"""
from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from camopd_megatron.config import Config, config_from_dict
from camopd_megatron.config.loader import deep_merge, read_yaml
from camopd_megatron.demo.probe import DemoEvaluator
from camopd_megatron.demo.tasks import ALL_TASKS, DOMAIN_TASKS, GENERAL_TASKS, sample_problems, write_prompt_file
from camopd_megatron.demo.teachers import TeacherArtifacts, eval_set

__all__ = ["METHODS", "StudySettings", "stage3_config", "run_method", "run_study", "summarize", "format_table",
           "diagnostics_table", "mean_curves", "mean_ci95", "mean_metric", "METHOD_OVERRIDES", "cosine_series", "mean_cosine_curve", "domain_sample_share", "mixed_shares", "branch_kept_fraction", "final_eval",
           "ProbeSettings", "run_conflict_probe", "format_probe"]

logger = logging.getLogger(__name__)

METHODS: dict[str, str] = {
    "camopd": "camopd.yaml",
    "vanilla_mopd": "vanilla_mopd.yaml",
    "no_selection": "no_selection.yaml",
    "no_selection_no_scaling": "no_selection_no_scaling.yaml",
    "no_decoupling": "no_decoupling.yaml",
    "camopd_per_branch": "camopd.yaml",
    "camopd_scale_lr": "camopd.yaml",
}
"""Method name → preset file in ``examples/configs`` (docs/algorithm.md §7), plus :data:`METHOD_OVERRIDES`."""
METHOD_OVERRIDES: dict[str, dict[str, Any]] = {
    "camopd_per_branch": {"optim": {"branch_state": "per_branch"}},  # one set of Adam moments per branch
    "camopd_scale_lr": {"selection": {"scale_mode": "lr"}},  # r_b on the step's learning rate
}
"""CaMOPD variants that are a preset plus a few keys (merged after the preset, before demo.yaml)."""

_REPO = Path(__file__).resolve().parents[2]
PRESET_DIR = _REPO / "examples" / "configs"
DEMO_YAML = _REPO / "examples" / "demo" / "demo.yaml"


@dataclass
class StudySettings:
    """Stage-3 budget (identical for every method)."""

    steps: int = 200
    seeds: Sequence[int] = (0,)
    eval_interval: int = 25
    eval_per_task: int = 60
    proxy_prompts: int = 2000
    last_evals: int = 3
    """A run's score is the mean of its last this many evaluations (less noise than the final one alone)."""
    methods: Sequence[str] = tuple(METHODS)
    overrides: dict[str, Any] = field(default_factory=dict)
    """Extra nested config values merged last (e.g. ``{"optim": {"lr": 5e-4}}``)."""

    def validate(self) -> None:
        """ValueError naming the bad setting."""
        if self.steps < 1:
            raise ValueError(f"steps: got {self.steps}; use >= 1")
        if not self.seeds:
            raise ValueError("seeds: empty; give at least one seed")
        if self.eval_interval < 1:
            raise ValueError(f"eval_interval: got {self.eval_interval}; use >= 1")
        if self.last_evals < 1:
            raise ValueError(f"last_evals: got {self.last_evals}; use >= 1")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"methods: unknown {unknown}; use some of {', '.join(METHODS)}")


def write_prompt_files(root: Path, n: int) -> dict[str, str]:
    """The stage-3 prompt files: general = proxy pool of the general tasks, domain = domain pool."""
    general = write_prompt_file(root / "general_proxy.jsonl", sample_problems(GENERAL_TASKS, "proxy", n, seed=101))
    domain = write_prompt_file(root / "domain.jsonl", sample_problems(DOMAIN_TASKS, "train", n, seed=202))
    return {"general": str(general), "domain": str(domain)}


def stage3_config(method: str, seed: int, teachers: TeacherArtifacts, settings: StudySettings, run_dir: Path,
                  prompt_files: dict[str, str]) -> Config:
    """The full trainer config of one (method, seed) run: preset ⊕ demo.yaml ⊕ run-specific values."""
    if method not in METHODS:
        raise ValueError(f"method: unknown {method!r}; use one of {', '.join(METHODS)}")
    raw = deep_merge(deep_merge(read_yaml(str(PRESET_DIR / METHODS[method])), METHOD_OVERRIDES.get(method, {})),
                     read_yaml(str(DEMO_YAML)))
    # the student starts from the domain teacher; its architecture is read from that checkpoint
    model = {"init": "checkpoint", "checkpoint": teachers.domain_ckpt, "seq_length": teachers.model["seq_length"],
             "transformer_impl": teachers.model.get("transformer_impl", "local")}
    run_specific = {
        "run": {"seed": int(seed), "steps": settings.steps, "output_dir": str(run_dir)},
        "model": model,
        "teachers": [
            {"name": "general", "checkpoint": teachers.general_ckpt, "branches": ["general"]},
            {"name": "domain", "checkpoint": teachers.domain_ckpt, "branches": ["domain"]},
        ],
        "data": {"branches": {b: {"paths": [p]} for b, p in prompt_files.items()}},
        "eval": {"interval": settings.eval_interval},
        "logging": {"diagnostics_interval": settings.eval_interval},
    }
    raw = deep_merge(deep_merge(raw, run_specific), settings.overrides)
    return config_from_dict(raw)


def run_method(method: str, seed: int, teachers: TeacherArtifacts, settings: StudySettings, out_dir: Path,
               prompt_files: dict[str, str]) -> Optional[list[dict[str, float]]]:
    """Train one (method, seed) and return its per-step history (with eval metrics at eval steps; the last
    entry also holds ``run/seconds`` and ``run/cpu_seconds``, this process's CPU time for the run), or None
    when the trainer stopped early (SIGTERM and the like): a cut-short run has no place in the table."""
    from camopd_megatron.trainer import train  # heavy import, only when stage 3 runs

    cfg = stage3_config(method, seed, teachers, settings, out_dir / "runs" / f"{method}_s{seed}", prompt_files)
    evaluator = DemoEvaluator(cfg.model, eval_set(ALL_TASKS, settings.eval_per_task))
    t0, c0 = time.perf_counter(), time.process_time()
    result = train(cfg, eval_fn=evaluator)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if result.stopped:
        logger.warning("stage 3: %s seed %d stopped at step %d (%s); not recorded", method, seed,
                       result.steps_done, result.stopped)
        return None
    logger.info("stage 3: %s seed %d done in %.0fs (%.0f CPU s)", method, seed, seconds, cpu)
    history = list(result.history)
    if history:
        history[-1] = {**history[-1], "run/seconds": seconds, "run/cpu_seconds": cpu}
    return history


def run_study(teachers: TeacherArtifacts, settings: StudySettings, out_dir: str | Path) -> dict[str, Any]:
    """Every method × seed (seed by seed); writes and returns ``{"histories": {method: [history per seed]}, ...}``.

    ``histories.json`` is rewritten after every run (``"complete": false`` until the last one), so an
    interrupted study still leaves its finished runs for ``--report-only``."""
    settings.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompt_files = write_prompt_files(out / "prompts", settings.proxy_prompts)
    histories: dict[str, list[list[dict[str, float]]]] = {}
    runs = [(m, s) for s in settings.seeds for m in settings.methods]
    from tqdm import tqdm

    study = {"settings": _jsonable(dataclasses.asdict(settings)), "teachers": teachers.metrics, "histories": histories,
             "complete": False}
    for i, (method, seed) in enumerate(tqdm(runs, desc="stage 3 (methods x seeds)", mininterval=1.0)):
        history = run_method(method, seed, teachers, settings, out, prompt_files)
        if history is None:  # stopped by a signal: keep what finished and stop the study
            break
        histories.setdefault(method, []).append(history)
        study["complete"] = i == len(runs) - 1
        (out / "histories.json").write_text(json.dumps(study))
    return study


@dataclass
class ProbeSettings:
    """The branch-conflict check before any method comparison: vanilla MOPD runs whose trainer probe
    (``logging.diagnostics_interval``) takes ``prompts`` unique prompts per branch, each sampled ``samples``
    times (the probe batch is ``prompts * samples`` draws from a ``prompts``-line file: whole epochs)."""

    prompts: int = 256
    samples: int = 4
    steps: int = 50
    interval: int = 10
    seeds: Sequence[int] = (0, 1, 2)
    overrides: dict[str, Any] = field(default_factory=dict)


def run_conflict_probe(teachers: TeacherArtifacts, probe: ProbeSettings, out_dir: str | Path) -> dict[str, Any]:
    """Vanilla MOPD with the conflict probe on (one run per seed; training draws from the same
    ``prompts``-line files as the probe); returns and writes ``probe.json`` (every cosine after step 0,
    where the domain gap is exactly 0, with its step and seed)."""
    from camopd_megatron.trainer import train  # heavy import, only when it runs

    out = Path(out_dir)
    key = {"settings": _jsonable(dataclasses.asdict(probe)), "teachers": teachers.metrics}
    if (out / "probe.json").is_file():  # the same check on the same teachers: reuse it
        old = json.loads((out / "probe.json").read_text())
        if {k: old.get(k) for k in key} == key:
            logger.info("conflict probe: reusing %s", out / "probe.json")
            return old
    files = {
        "general": str(write_prompt_file(out / "probe_prompts" / "general.jsonl",
                                         sample_problems(GENERAL_TASKS, "proxy", probe.prompts, seed=303, unique=True))),
        "domain": str(write_prompt_file(out / "probe_prompts" / "domain.jsonl",
                                        sample_problems(DOMAIN_TASKS, "train", probe.prompts, seed=404, unique=True))),
    }
    settings = StudySettings(steps=probe.steps, eval_interval=probe.interval, overrides=deep_merge(
        {"logging": {"diagnostics_prompts": probe.prompts * probe.samples}}, probe.overrides))
    cosines: list[dict[str, float]] = []
    for seed in probe.seeds:
        cfg = stage3_config("vanilla_mopd", seed, teachers, settings, out / "probe_runs" / f"s{seed}", files)
        t0 = time.perf_counter()
        history = train(cfg).history
        logger.info("conflict probe: seed %d done in %.0fs", seed, time.perf_counter() - t0)
        cosines += [{"seed": seed, "step": st, "cosine": c} for st, c in cosine_series(history) if st > 0]
    mean, half = mean_ci95([c["cosine"] for c in cosines])
    result = {**key, "lr": cfg.optim.lr, "cosines": cosines,
              "mean": mean, "ci95": [mean - half, mean + half], "n": len(cosines)}
    (out / "probe.json").write_text(json.dumps(result, indent=1))
    return result


def format_probe(result: dict[str, Any]) -> str:
    """One line: mean cos(g_general, g_domain) with its 95% interval, and whether it passes the gate."""
    lo, hi = result["ci95"]
    s = result["settings"]
    ok = result["mean"] <= -0.1 and hi < 0
    return (f"{'ok  ' if ok else 'FAIL'} vanilla MOPD cos(g_general, g_domain) = {result['mean']:+.3f}, 95% interval "
            f"[{lo:+.3f}, {hi:+.3f}] over {result['n']} probes ({s['prompts']} prompts x {s['samples']} samples per "
            f"branch, every {s['interval']} of {s['steps']} steps, seeds {list(s['seeds'])}, lr {result['lr']:g}); "
            "gate: mean <= -0.1 and the interval excludes 0")


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=list))


def final_eval(history: Sequence[dict[str, float]], last: int = 1) -> dict[str, float]:
    """The mean of the last ``last`` history entries that carry eval metrics (``eval/`` prefix stripped)."""
    evals = [{k.removeprefix("eval/"): v for k, v in e.items() if k.startswith("eval/")} for e in history]
    evals = [ev for ev in evals if ev][-last:]
    keys = set().union(*evals) if evals else set()
    return {k: statistics.fmean(ev[k] for ev in evals if k in ev) for k in keys}


_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
"""Two-sided 95% Student-t quantiles for 1..30 degrees of freedom (1.96 beyond)."""


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval of the mean); half-width 0 for a single value."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return mean, 0.0
    t = _T95[len(vals) - 2] if len(vals) - 1 <= len(_T95) else 1.96
    return mean, t * statistics.stdev(vals) / len(vals) ** 0.5


COLUMNS: tuple[str, ...] = ("acc/general", "acc/domain", "exact/general", "exact/domain",
                            *(f"acc/{t}" for t in GENERAL_TASKS + DOMAIN_TASKS))


def summarize(study: dict[str, Any]) -> list[tuple[str, dict[str, tuple[float, float]], int]]:
    """Rows ``(name, {column: (mean, 95% half-width)}, n_seeds)``: the two teachers, then each method
    (per seed: the mean of its last ``settings.last_evals`` evaluations; then mean and t-interval over seeds)."""
    rows: list[tuple[str, dict[str, tuple[float, float]], int]] = []
    labels = {"general_teacher": "general teacher T_g", "domain_teacher": "domain teacher T_d (= init)"}
    for key, label in labels.items():
        rows.append((label, {c: (study["teachers"][key].get(c, float("nan")), 0.0) for c in COLUMNS}, 1))
    last = int(study["settings"].get("last_evals", 1))
    for method, runs in study["histories"].items():
        finals = [final_eval(h, last) for h in runs]
        cols = {c: mean_ci95([f[c] for f in finals if c in f]) for c in COLUMNS}
        rows.append((method, cols, len(finals)))
    return rows


def format_table(rows: Sequence[tuple[str, dict[str, tuple[float, float]], int]]) -> str:
    """Markdown table, scores in %, ``mean ± 95% half-width`` when a row has several seeds."""
    head = ["setting", "seeds"] + [c.removeprefix("acc/") for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, cols, n in rows:
        cells = []
        for c in COLUMNS:
            mean, std = cols[c]
            cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}")
        lines.append("| " + " | ".join([name, str(n)] + cells) + " |")
    return "\n".join(lines)


def mean_curves(runs: Sequence[Sequence[dict[str, float]]], key: str) -> tuple[list[float], list[float]]:
    """(steps, mean over seeds) of metric ``key`` at the steps where every seed logged it."""
    per_step: dict[float, list[float]] = {}
    for h in runs:
        for e in h:
            if key in e:
                per_step.setdefault(e["step"], []).append(e[key])
    steps = sorted(s for s, v in per_step.items() if len(v) == len(runs))
    return steps, [statistics.fmean(per_step[s]) for s in steps]


def branch_kept_fraction(runs: Sequence[Sequence[dict[str, float]]], branch: str, *, rule: bool = False) -> Optional[float]:
    """Mean kept fraction of ``branch`` over the steps that trained it (``rule``: what the rho-rule
    would keep, meaningful for the no-selection ablations too); None if no such step."""
    key = f"select/{branch}/{'rule_' if rule else ''}kept_fraction"
    vals = [e[key] for h in runs for e in h if key in e]
    return statistics.fmean(vals) if vals else None


def cosine_series(history: Sequence[dict[str, float]]) -> list[tuple[float, float]]:
    """``(step, cos(g_general, g_domain))`` pairs from the trainer's probe ``diag/grad_cosine`` (taken
    before update ``step``, logged with ``step + 1``)."""
    out = [(e["step"] - 1, e["diag/grad_cosine"]) for e in history if "diag/grad_cosine" in e]
    return [(st, c) for st, c in out if c == c]  # drop NaN (a zero gradient has no direction)


def mean_cosine_curve(runs: Sequence[Sequence[dict[str, float]]]) -> tuple[list[float], list[float]]:
    """(steps, mean over seeds) of :func:`cosine_series` at steps every seed probed."""
    per_step: dict[float, list[float]] = {}
    for h in runs:
        for st, c in cosine_series(h):
            per_step.setdefault(st, []).append(c)
    steps = sorted(st for st, v in per_step.items() if len(v) == len(runs))
    return steps, [statistics.fmean(per_step[st]) for st in steps]


def mixed_shares(method: str) -> dict[str, float]:
    """``scheduler.mixed_shares`` of a method's preset (how a mixed step splits its prompts)."""
    shares = read_yaml(str(PRESET_DIR / METHODS[method])).get("scheduler", {}).get("mixed_shares", {})
    return {b: float(shares.get(b, 1.0)) for b in ("general", "domain")}


def domain_sample_share(runs: Sequence[Sequence[dict[str, float]]],
                        shares: Optional[dict[str, float]] = None) -> Optional[float]:
    """Share of the *trained* (kept) samples that were domain samples, over all steps and seeds.

    A step trains the branches whose ``select/<b>/kept_fraction`` it logs; a two-branch (mixed) step
    splits ``rollout/samples`` by ``shares`` (the preset's ``scheduler.mixed_shares``; default 1:1).
    """
    shares = shares or {"general": 1.0, "domain": 1.0}
    kept = {"general": 0.0, "domain": 0.0}
    for h in runs:
        for e in h:
            present = [b for b in kept if f"select/{b}/kept_fraction" in e]
            if not present or "rollout/samples" not in e:
                continue
            total_share = sum(shares[b] for b in present)
            for b in present:
                kept[b] += e[f"select/{b}/kept_fraction"] * e["rollout/samples"] * shares[b] / total_share
    total = kept["general"] + kept["domain"]
    return kept["domain"] / total if total else None


def mean_metric(runs: Sequence[Sequence[dict[str, float]]], key: str) -> Optional[float]:
    """Mean of ``key`` over every step of every seed that logged it (None if none did)."""
    vals = [e[key] for h in runs for e in h if key in e]
    return statistics.fmean(vals) if vals else None


CLIP_KEYS: dict[str, str] = {"IS mask": "train/is_clip_rate", "adv clip": "train/adv_clip_rate",
                             "grad clip": "grad_clipped"}
"""Clip rates in the diagnostics table: tokens outside the IS window, tokens whose |gap| hit loss.adv_clip,
updates whose gradient norm hit optim.clip_grad."""


def diagnostics_table(study: dict[str, Any]) -> str:
    """Markdown: per method, mean kept fraction per branch (actual / what the rho-rule would keep)
    over the steps that trained the branch, the domain share of the trained samples, the clip rates
    (:data:`CLIP_KEYS`, mean over steps), and the trainer's probe cos(g_general, g_domain) after
    step 0 (mean ± 95% half-width over probes, share of negative probes)."""
    lines = ["| method | general kept (rule) | domain kept (rule) | domain share of trained samples | "
             + " | ".join(f"{k} rate" for k in CLIP_KEYS) + " | cos(g_g, g_d) | cos < 0 share | probes |",
             "|---|---|---|---|" + "---|" * len(CLIP_KEYS) + "---|---|---|"]
    for method, runs in study["histories"].items():
        cells = []
        for b in ("general", "domain"):
            kept, rule = branch_kept_fraction(runs, b), branch_kept_fraction(runs, b, rule=True)
            cells.append("-" if kept is None else f"{kept:.2f} ({rule:.2f})")
        share = domain_sample_share(runs, mixed_shares(method) if method in METHODS else None)
        cells.append("-" if share is None else f"{share:.2f}")
        for key in CLIP_KEYS.values():
            rate = mean_metric(runs, key)
            cells.append("-" if rate is None else f"{rate:.3f}")
        cos = [c for h in runs for st, c in cosine_series(h) if st > 0]
        cells.append("{:+.3f} ± {:.3f}".format(*mean_ci95(cos)) if cos else "-")
        cells.append(f"{sum(c < 0 for c in cos) / len(cos):.2f}" if cos else "-")
        cells.append(str(len(cos)))
        lines.append("| " + " | ".join([method, *cells]) + " |")
    return "\n".join(lines)
