"""The megatron compatibility layer is applied once, on request, and keyed on what each bug needs.

* A fresh interpreter that imports every module of the package has patched nothing in megatron
  (every registered target is the upstream object) until ``init_distributed`` installs the layer;
  after it, every target of every applied patch is replaced.
* ``compat.install()`` before megatron is imported applies the layer right after that import.
* The keying: the no-CUDA patches apply exactly when CUDA is absent, the torch-Adam fixes exactly
  when megatron has no fused Adam (TE/apex), whether or not CUDA is there.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from camopd_megatron.compat import Condition, Facts, patch_registry, patches_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_RESOLVE = '''
import importlib, json, logging, pkgutil, sys

def resolve(target):
    """The object a registry target names now ("logging:<name>": the logger's filters)."""
    if target.startswith("logging:"):
        return list(logging.getLogger(target[len("logging:"):]).filters)
    module, _, attrs = target.partition(":")
    obj = importlib.import_module(module)
    for attr in attrs.split("."):
        obj = getattr(obj, attr)
    return obj
'''

_IMPORT_ALL = _RESOLVE + '''
import camopd_megatron
from camopd_megatron import compat

SCOPED = ["megatron.core.optimizer:torch"]  # compat.param_groups_aligned_over swaps it during a build
targets = [t for p in compat.patch_registry() for t in p.targets] + SCOPED
before = {t: resolve(t) for t in targets}  # imports megatron (prepared by `import camopd_megatron`)
imported, skipped = [], []
for info in pkgutil.walk_packages(camopd_megatron.__path__, "camopd_megatron."):
    if info.name.endswith("__main__"):
        continue  # running it would start the program
    try:
        importlib.import_module(info.name)
    except ImportError as e:  # demo/ and bench/ may need extras (matplotlib, ...)
        if not info.name.startswith(("camopd_megatron.demo", "camopd_megatron.bench")):
            raise
        skipped.append(f"{info.name}: {e}")
        continue
    imported.append(info.name)
changed_on_import = [t for t in targets if resolve(t) != before[t]]
applied_on_import = list(compat.applied_patches())

from camopd_megatron.distributed import destroy_distributed, init_distributed
init_distributed(backend="gloo")
destroy_distributed()
applied = list(compat.applied_patches())
by_name = {p.name: p for p in compat.patch_registry()}
unchanged_after = [t for name in applied for t in by_name[name].targets if resolve(t) == before[t]]
print(json.dumps(dict(imported=imported, skipped=skipped, changed_on_import=changed_on_import,
                      applied_on_import=applied_on_import, applied=applied, unchanged_after=unchanged_after,
                      scoped_untouched=[resolve(t) == before[t] for t in SCOPED])))
'''

_INSTALL_FIRST = '''
import json, sys
from camopd_megatron import compat
compat.install()
compat.install()  # idempotent
out = dict(before_import=list(compat.applied_patches()), megatron_imported="megatron.core" in sys.modules)
from camopd_megatron.models.gpt import build_gpt_model  # imports megatron.core
import megatron.core
import megatron.core.utils as mu
out.update(after_import=list(compat.applied_patches()), utils_torch=type(mu.torch).__name__,
           loader_restored=megatron.core.__loader__ is megatron.core.__spec__.loader
           and type(megatron.core.__loader__).__name__ == "SourceFileLoader",
           hooks_left=[type(f).__name__ for f in sys.meta_path if "camopd" in type(f).__module__])
print(json.dumps(out))
'''


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_every_module_patches_nothing_until_init_distributed():
    res = _run(_IMPORT_ALL)
    names = [p.name for p in patch_registry()]
    assert len(res["imported"]) > 40 and "camopd_megatron.trainer" in res["imported"], res["skipped"]
    assert all(s.startswith(("camopd_megatron.demo", "camopd_megatron.bench")) for s in res["skipped"])
    assert res["changed_on_import"] == [] and res["applied_on_import"] == []
    assert res["applied"] == names  # this machine: no CUDA, no TE/apex
    assert res["unchanged_after"] == [] and res["scoped_untouched"] == [True]


def test_install_before_megatron_applies_right_after_its_import():
    res = _run(_INSTALL_FIRST)
    assert res["before_import"] == [] and not res["megatron_imported"]
    assert res["after_import"] == [p.name for p in patch_registry()]
    assert res["utils_torch"] == "_TorchProxy" and res["loader_restored"] and res["hooks_left"] == []


def test_keying_on_cuda_and_fused_adam():
    def names(cuda: bool, fused_adam: bool) -> set[str]:
        return {p.name for p in patches_for(Facts(cuda=cuda, fused_adam=fused_adam))}

    by_condition: dict[Condition, set[str]] = {c: set() for c in Condition}
    for p in patch_registry():
        by_condition[p.condition].add(p.name)
    no_cuda, no_fused, always = (by_condition[c] for c in (Condition.NO_CUDA, Condition.NO_FUSED_ADAM, Condition.ALWAYS))
    assert no_fused == {"distopt_torch_adam_checkpoint"}
    assert no_cuda == {
        "rng_tracker_on_cpu_generator", "device_factories_model", "pipeline_schedules", "ddp_and_optimizer_devices",
        "cuda_type_checks", "tied_embedding_tensor_cuda", "dist_checkpointing_devices", "distopt_dp_zero_gather_cuda",
        "moe_cuda_devices",
    }
    # a GPU without TE/apex keeps megatron's CUDA paths but needs the torch-Adam fixes
    assert names(cuda=True, fused_adam=False) == no_fused | always
    assert names(cuda=True, fused_adam=True) == always
    assert names(cuda=False, fused_adam=True) == no_cuda | always
    assert names(cuda=False, fused_adam=False) == no_cuda | no_fused | always
    assert len({p.name for p in patch_registry()}) == len(patch_registry())
