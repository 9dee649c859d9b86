"""Device profiles for the dry-run's stage-time estimate: peak FLOP/s and memory bandwidth of one device.

The GPU entries are vendor data-sheet figures for one SXM GPU, dense (no 2:4 sparsity) bf16 tensor-core
peak and HBM bandwidth; real runs reach a fraction of them (the estimate is a floor). A CPU profile
is measured on the machine by ``python -m camopd_megatron.bench.calibrate``, from a matmul and a
memory-read micro-benchmark only, and written as JSON::

    {"name": "cpu-2t", "device_type": "cpu", "peak_flops": 1.6e11, "mem_bandwidth": 1.0e10,
     "memory_gib": 23.0, "dtype": "fp32", "source": "..."}

``camopd-train --dry-run --device-profile h100`` (a built-in name) or ``--device-profile prof.json``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, Optional

__all__ = ["DeviceProfile", "GPU_PROFILES", "load_profile"]


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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


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
    known = {f.name for f in fields(DeviceProfile)}
    if not isinstance(raw, dict):
        raise ValueError(f"device profile {path.name}: expected a JSON object with keys {sorted(known)}")
    missing = [k for k in ("name", "peak_flops", "mem_bandwidth") if k not in raw]
    unknown = sorted(set(raw) - known)
    if missing or unknown:
        raise ValueError(f"device profile {path.name}: " + "; ".join(
            ([f"missing key(s) {missing}"] if missing else []) + ([f"unknown key(s) {unknown}"] if unknown else []))
            + f"; expected keys {sorted(known)}")
    prof = DeviceProfile(**raw)
    if not (prof.peak_flops > 0 and prof.mem_bandwidth > 0) or prof.device_type not in ("cuda", "cpu"):
        raise ValueError(f"device profile {path.name}: peak_flops and mem_bandwidth must be positive and "
                         f"device_type cuda or cpu (got {prof.peak_flops}, {prof.mem_bandwidth}, {prof.device_type!r})")
    return prof
