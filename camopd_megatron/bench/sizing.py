"""The dry-run's stage-time estimate against measured stage times, on this machine (CPU).

    python -m camopd_megatron.bench.sizing --sizes small large --threads 2

Back to back in one process, so calibration and stages see the same load: the step benchmark's
setting (``bench.step``: its config, one process, colocated teacher, ``trainer.train`` itself)
runs N steps, and between every two steps (the trainer's ``eval_fn`` hook, outside the stage timers)
the CPU profile is calibrated from the micro-benchmarks (``bench.calibrate``: n = 1024 matmul, the
matmul table at the config's forward shapes (``calibrate.config_grid``), the elementwise rate,
256 MiB read, median of 3). Each steady step's stages are compared with the planner's estimate
(``planner.plan`` with the profile, the same config) at the mean of the calibrations just before and
after it; the report gives the median and the range of estimated / measured per stage, the estimate
at the median of all calibrations over the median measured stage, and the same with the profile cut
down to ``peak_flops`` and bandwidth (no table, no elementwise rate: the estimate before them). The
profile never sees a stage timing.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from camopd_megatron.bench import set_thread_env

STAGES = ("rollout", "teacher", "recompute", "train", "optimizer")


def estimate_for(cfg_dict: dict[str, Any], profile: dict[str, Any]) -> dict[str, float]:
    """The planner's per-stage seconds for the benchmark config (world 1), teachers summed."""
    from camopd_megatron.config import config_from_dict
    from camopd_megatron.planner import plan, profile_from_dict

    est = plan(config_from_dict(cfg_dict), 1, profile=profile_from_dict(profile, "calibration")).stages
    assert est is not None
    out: dict[str, float] = {}
    for s in est.stages:
        key = "teacher" if s.name.startswith("teacher ") else s.name
        out[key] = out.get(key, 0.0) + s.seconds
    return out


def combine(calibs: list[dict[str, Any]], pick: Callable[[list[float]], float]) -> dict[str, Any]:
    """One profile from several calibrations of the same grid: ``pick`` (mean, median) of each rate."""
    out = {**calibs[0]}
    for key in ("peak_flops", "mem_bandwidth", "elementwise_rate"):
        if key in out:
            out[key] = pick([c[key] for c in calibs])
    if "matmul_rates" in out:
        out["matmul_rates"] = [{**r, "flops": pick([c["matmul_rates"][i]["flops"] for c in calibs])}
                               for i, r in enumerate(out["matmul_rates"])]
    return out


def peak_only(profile: dict[str, Any]) -> dict[str, Any]:
    """The profile without its matmul table and elementwise rate: every product at ``peak_flops``."""
    return {k: v for k, v in profile.items() if k not in ("matmul_rates", "elementwise_rate")}


def run(sizes: list[str], threads: int, steps: int, teachers: int) -> list[dict[str, Any]]:
    """Per size: the trainer's steps with a calibration between every two (its ``eval_fn`` hook, outside
    the stage timers); each step's stages against the estimate at the mean of its two neighbouring
    calibrations; medians and ranges of est/measured over the steady steps (2..N)."""
    import statistics

    import torch

    from camopd_megatron.bench import calibrate, step
    from camopd_megatron.config import config_from_dict
    from camopd_megatron.trainer import train

    torch.set_num_threads(threads)
    rows = []
    for size in sizes:
        calibs: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory(prefix="camopd_sizing_") as tmp:
            cfg_dict = step.bench_config_dict(Path(tmp), size=size, teachers=teachers, layout="single", steps=steps)
            grid = calibrate.config_grid(config_from_dict(cfg_dict))

            def hook(_step: int, _model: Any, _pgc: Any) -> dict[str, float]:
                calibs.append(calibrate.measure(threads, sizes=(1024,), mib=256, reps=3, grid=grid))
                return {}

            res = train(config_from_dict(cfg_dict), eval_fn=hook)
        hist = [h for h in res.history if "time/step" in h]
        per_step = []
        for i, h in enumerate(hist[1:], start=1):  # steady steps; calibs[i] ran before step i+1, calibs[i+1] after
            est = estimate_for(cfg_dict, combine([calibs[i], calibs[i + 1]], statistics.mean))
            per_step.append({k: (est.get(k, 0.0), h.get(f"time/{k}", 0.0)) for k in STAGES})
        stages = {}
        for k in STAGES:
            pairs = [s[k] for s in per_step if s[k][1] > 0 or s[k][0] > 0]
            if not pairs:
                continue
            ratios = [e / m for e, m in pairs if m > 0]
            stages[k] = {"estimate_s": round(statistics.median(e for e, _ in pairs), 4),
                         "measured_s": round(statistics.median(m for _, m in pairs), 4),
                         "ratio": round(statistics.median(ratios), 3) if ratios else None,
                         "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)] if ratios else None}
        med = combine(calibs, statistics.median)
        # the same at the median of all the run's calibrations against the median measured stage (less noisy),
        # and with the profile cut down to peak FLOP/s and bandwidth (the estimate without table and elementwise)
        est_med, est_peak = estimate_for(cfg_dict, med), estimate_for(cfg_dict, peak_only(med))
        for k, v in stages.items():
            v["ratio_median_calibration"] = round(est_med[k] / v["measured_s"], 3) if v["measured_s"] and k in est_med \
                else None
            v["ratio_peak_only"] = round(est_peak[k] / v["measured_s"], 3) if v["measured_s"] and k in est_peak \
                else None
        flops = [c["peak_flops"] for c in calibs]
        bw = [c["mem_bandwidth"] for c in calibs]
        ew = [c["elementwise_rate"] for c in calibs]
        table = [r["flops"] for r in med["matmul_rates"]]
        rows.append({"size": size, "teachers": teachers, "threads": threads, "steps": len(hist),
                     "calibration": {"peak_flops": [min(flops), statistics.median(flops), max(flops)],
                                     "mem_bandwidth": [min(bw), statistics.median(bw), max(bw)],
                                     "elementwise_rate": [min(ew), statistics.median(ew), max(ew)],
                                     "matmul_table": {"shapes": len(table), "median_flops": [min(table), max(table)],
                                                      "grid": [list(a) for a in grid]}},
                     "stages": stages})
    return rows


def format_row(r: dict[str, Any]) -> str:
    c = r["calibration"]
    f, b, e, t = c["peak_flops"], c["mem_bandwidth"], c["elementwise_rate"], c["matmul_table"]
    lines = [f"{r['size']} teachers={r['teachers']} threads={r['threads']} steps={r['steps']}: calibrations "
             f"(min/median/max) {f[0] / 1e9:.1f}/{f[1] / 1e9:.1f}/{f[2] / 1e9:.1f} GFLOP/s (n = 1024), "
             f"{b[0] / 1e9:.2f}/{b[1] / 1e9:.2f}/{b[2] / 1e9:.2f} GB/s, elementwise "
             f"{e[0] / 1e9:.2f}/{e[1] / 1e9:.2f}/{e[2] / 1e9:.2f} G ops/s; matmul table of {t['shapes']} shapes "
             f"{t['median_flops'][0] / 1e9:.1f}-{t['median_flops'][1] / 1e9:.1f} GFLOP/s (medians)"]
    for k, v in r["stages"].items():
        ratio = f"{v['ratio']:.2f} [{v['ratio_range'][0]:.2f}-{v['ratio_range'][1]:.2f}]" if v["ratio"] else "-"
        med, peak = v.get("ratio_median_calibration"), v.get("ratio_peak_only")
        lines.append(f"  {k:<10} estimate {v['estimate_s']:8.4f} s  measured {v['measured_s']:8.4f} s  "
                     f"est/meas per step {ratio}" + (f", at the median calibration {med:.2f}" if med else "")
                     + (f" (peak FLOP/s only: {peak:.2f})" if peak else ""))
    within = {k: r["stages"][k].get("ratio_median_calibration") for k in ("teacher", "train") if k in r["stages"]}
    lines.append("  target (train and teacher within 30 %, at the median calibration): "
                 + ", ".join(f"{k} {v:.2f} {'yes' if v is not None and 0.7 <= v <= 1.3 else 'NO'}"
                             for k, v in within.items()))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["small"], choices=("small", "large"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--teachers", type=int, choices=(1, 2), default=1)
    p.add_argument("--json", action="store_true", help="one JSON line per size")
    a = p.parse_args(argv)
    rows = run(a.sizes, a.threads, a.steps, a.teachers)
    for r in rows:
        print(json.dumps(r) if a.json else format_row(r), flush=True)
    return rows


if __name__ == "__main__":
    set_thread_env("2")
    main()
