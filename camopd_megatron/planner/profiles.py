"""Device profiles for the dry-run's stage-time estimate: peak FLOP/s and memory bandwidth of one device.

The GPU entries are vendor data-sheet figures for one SXM GPU, dense (no 2:4 sparsity) bf16 tensor-core
peak and HBM bandwidth; real runs reach a fraction of them (the estimate is a floor). A CPU profile
is measured on the machine by ``python -m camopd_megatron.bench.calibrate``, from matmul, elementwise
and memory-read micro-benchmarks only, and written as JSON::

    {"name": "cpu-2t", "device_type": "cpu", "peak_flops": 1.6e11, "mem_bandwidth": 1.0e10,
     "memory_gib": 23.0, "dtype": "fp32", "source": "...",
     "matmul_rates": [{"m": 512, "k": 256, "n": 256, "flops": 1.5e11}, ...], "elementwise_rate": 1.5e9}

``matmul_rates`` (optional) is a table of measured FLOP/s over a grid of shapes ``[m, k] @ [k, n]``
(every combination of its m, k and n values): a product's rate is interpolated in it
(:meth:`DeviceProfile.matmul_flops`); without it every product runs at ``peak_flops``.
``elementwise_rate`` (optional, element operations per second) prices the non-matmul work
(``planner.counts.forward_elementwise``); without it that work is not counted. The GPU entries have
neither: their estimate is FLOPs / peak.

``camopd-train --dry-run --device-profile h100`` (a built-in name) or ``--device-profile prof.json``.
"""
from __future__ import annotations

import bisect
import functools
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, Optional

__all__ = ["DeviceProfile", "GPU_PROFILES", "load_profile", "profile_from_dict"]


@dataclass(frozen=True)
class DeviceProfile:
    """What the stage-time estimate needs of one device (one rank)."""

    name: str
    peak_flops: float
    """FLOP/s of large matmuls in :attr:`dtype` (GPU: data-sheet peak; CPU: measured)."""
    mem_bandwidth: float
    """Bytes/s of streaming reads from device memory (GPU: data-sheet HBM; CPU: measured)."""
    device_type: Literal["cuda", "cpu"] = "cuda"
    memory_gib: Optional[float] = None
    """Device memory; the dry run warns when a rank's estimate exceeds it (unless --gpu-memory-gib says otherwise)."""
    dtype: str = "bf16"
    source: str = ""
    matmul_rates: Optional[tuple[tuple[float, float, float, float], ...]] = None
    """Measured ``(m, k, n, FLOP/s)`` of ``[m, k] @ [k, n]`` over a grid (every combination of its m, k, n values)."""
    elementwise_rate: Optional[float] = None
    """Measured element operations per second of the non-matmul work (norms, softmax, activations)."""

    def __post_init__(self) -> None:
        if self.matmul_rates is not None:
            object.__setattr__(self, "matmul_rates", tuple(tuple(float(x) for x in r) for r in self.matmul_rates))
            _grid(self.matmul_rates)  # a grid, or ValueError

    def matmul_flops(self, m: float, k: float, n: float) -> float:
        """FLOP/s of ``[m, k] @ [k, n]``: ``peak_flops`` without a table; else interpolated in
        :attr:`matmul_rates`, linearly in log(rate) over log(m), log(k), log(n) between the grid's
        neighbouring values (trilinear), each dimension clamped to the grid's range."""
        if not self.matmul_rates:
            return self.peak_flops
        axes, rate = _grid(self.matmul_rates)
        corners: list[list[tuple[float, float]]] = []  # per dim: (grid value, weight)
        for axis, x in zip(axes, (m, k, n)):
            x = min(max(x, axis[0]), axis[-1])
            i = min(bisect.bisect_left(axis, x), len(axis) - 1)
            if axis[i] == x or i == 0:
                corners.append([(axis[i], 1.0)])
                continue
            lo, hi = axis[i - 1], axis[i]
            w = math.log(x / lo) / math.log(hi / lo)
            corners.append([(lo, 1.0 - w), (hi, w)])
        if all(len(c) == 1 for c in corners):  # a grid point
            return rate[(corners[0][0][0], corners[1][0][0], corners[2][0][0])]
        log_rate = sum(wm * wk * wn * math.log(rate[(a, b, c)])
                       for a, wm in corners[0] for b, wk in corners[1] for c, wn in corners[2])
        return math.exp(log_rate)

    def to_dict(self) -> dict[str, Any]:
        """The JSON fields (:func:`load_profile` reads them back); the table as ``{m, k, n, flops}`` records."""
        d = asdict(self)
        if self.matmul_rates is not None:
            d["matmul_rates"] = [{"m": int(m), "k": int(k), "n": int(n), "flops": f} for m, k, n, f in self.matmul_rates]
        else:
            del d["matmul_rates"]
        if self.elementwise_rate is None:
            del d["elementwise_rate"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


@functools.lru_cache(maxsize=32)
def _grid(rates: tuple[tuple[float, ...], ...]) -> tuple[list[list[float]], dict[tuple[float, float, float], float]]:
    """The sorted axes and the rate by ``(m, k, n)`` of a table; ValueError unless it covers every combination."""
    if not rates:
        raise ValueError("matmul_rates is empty; drop the key or rewrite the profile with "
                         "`python -m camopd_megatron.bench.calibrate`")
    by = {}
    for r in rates:
        if len(r) != 4 or not all(x > 0 for x in r):
            raise ValueError(f"matmul_rates entry {r}: expected positive m, k, n and flops; rewrite the profile with "
                             "`python -m camopd_megatron.bench.calibrate`")
        by[(r[0], r[1], r[2])] = r[3]
    axes = [sorted({key[i] for key in by}) for i in range(3)]
    if len(by) != len(rates) or len(by) != len(axes[0]) * len(axes[1]) * len(axes[2]):
        raise ValueError(f"matmul_rates: {len(rates)} entries do not form a grid (every combination of m in "
                         f"{axes[0]}, k in {axes[1]}, n in {axes[2]}, once each); rewrite the profile with "
                         "`python -m camopd_megatron.bench.calibrate`")
    return axes, by


GPU_PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        # NVIDIA data sheets, SXM form factor; BF16 tensor core dense = half the "with sparsity" figure
        DeviceProfile("a100", 312e12, 2.039e12, memory_gib=80, source="NVIDIA A100 80GB SXM data sheet"),
        DeviceProfile("h100", 989e12, 3.35e12, memory_gib=80, source="NVIDIA H100 SXM data sheet"),
        DeviceProfile("h200", 989e12, 4.8e12, memory_gib=141, source="NVIDIA H200 SXM data sheet"),
        DeviceProfile("b200", 2.25e15, 8.0e12, memory_gib=180, source="NVIDIA DGX/HGX B200 data sheet, per GPU"),
    )
}
"""Built-in GPU profiles by name."""


def load_profile(spec: str) -> DeviceProfile:
    """A built-in profile by name (:data:`GPU_PROFILES`, case-insensitive) or a profile JSON file."""
    key = spec.strip().lower()
    if key in GPU_PROFILES:
        return GPU_PROFILES[key]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"device profile {spec!r}: neither a built-in profile ({', '.join(GPU_PROFILES)}) nor a "
                         f"file; write one with `python -m camopd_megatron.bench.calibrate --out {spec}`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"device profile {path.name}: not valid JSON ({e}); rewrite it with "
                         "`python -m camopd_megatron.bench.calibrate`") from e
    return profile_from_dict(raw, path.name)


def profile_from_dict(raw: Any, where: str = "dict") -> DeviceProfile:
    """A profile from its JSON fields (:meth:`DeviceProfile.to_dict`; ``bench.calibrate``'s record, whose
    ``raw`` measurements are ignored), checked; ``where`` names it in the errors."""
    known = {f.name for f in fields(DeviceProfile)}
    if not isinstance(raw, dict):
        raise ValueError(f"device profile {where}: expected a JSON object with keys {sorted(known)}")
    raw = {k: v for k, v in raw.items() if k != "raw"}
    missing = [k for k in ("name", "peak_flops", "mem_bandwidth") if k not in raw]
    unknown = sorted(set(raw) - known)
    if missing or unknown:
        raise ValueError(f"device profile {where}: " + "; ".join(
            ([f"missing key(s) {missing}"] if missing else []) + ([f"unknown key(s) {unknown}"] if unknown else []))
            + f"; expected keys {sorted(known)}")
    table = raw.get("matmul_rates")
    if table is not None:
        if not isinstance(table, list) or not all(isinstance(r, dict) and set(r) == {"m", "k", "n", "flops"}
                                                  for r in table):
            raise ValueError(f"device profile {where}: matmul_rates must be a list of {{\"m\", \"k\", \"n\", "
                             "\"flops\"}} records; rewrite it with `python -m camopd_megatron.bench.calibrate`")
        raw = {**raw, "matmul_rates": tuple((r["m"], r["k"], r["n"], r["flops"]) for r in table)}
    try:
        prof = DeviceProfile(**raw)
    except ValueError as e:
        raise ValueError(f"device profile {where}: {e}") from e
    if prof.elementwise_rate is not None and not prof.elementwise_rate > 0:
        raise ValueError(f"device profile {where}: elementwise_rate must be positive (got {prof.elementwise_rate}); "
                         "drop the key or rewrite the profile with `python -m camopd_megatron.bench.calibrate`")
    if not (prof.peak_flops > 0 and prof.mem_bandwidth > 0) or prof.device_type not in ("cuda", "cpu"):
        raise ValueError(f"device profile {where}: peak_flops and mem_bandwidth must be positive and "
                         f"device_type cuda or cpu (got {prof.peak_flops}, {prof.mem_bandwidth}, {prof.device_type!r})")
    return prof
