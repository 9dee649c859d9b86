"""The dry-run's stage-time estimate against measured stage times, on this machine (CPU).

    python -m camopd_megatron.bench.sizing --sizes small large --threads 2

Back to back in one process, so calibration and stages see the same load: the step benchmark's
setting (``bench.step``: its config, one process, colocated teacher, ``trainer.train`` itself)
runs N steps, and between every two steps (the trainer's ``eval_fn`` hook, outside the stage timers)
the CPU profile is calibrated from the matmul and memory-read micro-benchmarks
(``bench.calibrate``: n = 1024 matmul, 256 MiB read, median of 3). Each steady step's stages are
compared with the planner's estimate (``planner.plan`` with the profile, the same config) at the
mean of the calibrations just before and after it; the report gives the median and the range of
estimated / measured per stage, and the estimate at the median of all calibrations over the median
measured stage. The profile never sees a stage timing.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any, Optional

from camopd_megatron.bench import set_thread_env

STAGES = ("rollout", "teacher", "recompute", "train", "optimizer")


def estimate_for(cfg_dict: dict[str, Any], profile: dict[str, Any]) -> dict[str, float]:
    """The planner's per-stage seconds for the benchmark config (world 1), teachers summed."""
    from camopd_megatron.config import config_from_dict
    from camopd_megatron.planner import DeviceProfile, plan

    prof = DeviceProfile(**{k: v for k, v in profile.items() if k != "raw"})
    est = plan(config_from_dict(cfg_dict), 1, profile=prof).stages
    assert est is not None
    out: dict[str, float] = {}
    for s in est.stages:
        key = "teacher" if s.name.startswith("teacher ") else s.name
        out[key] = out.get(key, 0.0) + s.seconds
    return out


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

        def hook(_step: int, _model: Any, _pgc: Any) -> dict[str, float]:
            calibs.append(calibrate.measure(threads, sizes=(1024,), mib=256, reps=3))
            return {}

        with tempfile.TemporaryDirectory(prefix="camopd_sizing_") as tmp:
            cfg_dict = step.bench_config_dict(Path(tmp), size=size, teachers=teachers, layout="single", steps=steps)
            res = train(config_from_dict(cfg_dict), eval_fn=hook)
        hist = [h for h in res.history if "time/step" in h]
        per_step = []
        for i, h in enumerate(hist[1:], start=1):  # steady steps; calibs[i] ran before step i+1, calibs[i+1] after
            c0, c1 = calibs[i], calibs[i + 1]
            prof = {**c0, "peak_flops": (c0["peak_flops"] + c1["peak_flops"]) / 2,
                    "mem_bandwidth": (c0["mem_bandwidth"] + c1["mem_bandwidth"]) / 2}
            est = estimate_for(cfg_dict, prof)
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
        flops = [c["peak_flops"] for c in calibs]
        bw = [c["mem_bandwidth"] for c in calibs]
        # the same at the median of all the run's calibrations against the median measured stage (less noisy)
        est_med = estimate_for(cfg_dict, {**calibs[0], "peak_flops": statistics.median(flops),
                                          "mem_bandwidth": statistics.median(bw)})
        for k, v in stages.items():
            v["ratio_median_calibration"] = round(est_med[k] / v["measured_s"], 3) if v["measured_s"] and k in est_med \
                else None
        rows.append({"size": size, "teachers": teachers, "threads": threads, "steps": len(hist),
                     "calibration": {"peak_flops": [min(flops), statistics.median(flops), max(flops)],
                                     "mem_bandwidth": [min(bw), statistics.median(bw), max(bw)]},
                     "stages": stages})
    return rows


def format_row(r: dict[str, Any]) -> str:
    f, b = r["calibration"]["peak_flops"], r["calibration"]["mem_bandwidth"]
    lines = [f"{r['size']} teachers={r['teachers']} threads={r['threads']} steps={r['steps']}: calibrations "
             f"(min/median/max) {f[0] / 1e9:.1f}/{f[1] / 1e9:.1f}/{f[2] / 1e9:.1f} GFLOP/s, "
             f"{b[0] / 1e9:.2f}/{b[1] / 1e9:.2f}/{b[2] / 1e9:.2f} GB/s"]
    for k, v in r["stages"].items():
        ratio = f"{v['ratio']:.2f} [{v['ratio_range'][0]:.2f}-{v['ratio_range'][1]:.2f}]" if v["ratio"] else "-"
        med = v.get("ratio_median_calibration")
        lines.append(f"  {k:<10} estimate {v['estimate_s']:8.4f} s  measured {v['measured_s']:8.4f} s  "
                     f"est/meas per step {ratio}" + (f", at the median calibration {med:.2f}" if med else ""))
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
