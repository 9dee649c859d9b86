"""Every camopd_megatron.compat patch on the real upstream code path it exists for (so a megatron
upgrade breaks loudly), plus the keying: with CUDA reported available only the patches that do not
depend on CUDA are applied."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from camopd_megatron.compat import patch_registry
from camopd_megatron.testing.multiproc import run_on_ranks
from tests import compat_workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> list[dict]:
    ckpt = tmp_path_factory.mktemp("compat_ckpt")
    return run_on_ranks(compat_workers.cpu_compat_paths, 2, args=(str(ckpt),), timeout_s=300, pg_timeout_s=60)


def test_every_patch_is_checked_and_applied(paths):
    names = [p.name for p in patch_registry()]
    for rank_out in paths:
        assert rank_out["applied"] == names  # on this machine: no CUDA, no TE/apex
        assert set(names) <= set(rank_out)


def test_paged_stash_stub(paths):
    assert paths[0]["paged_stash_stub"] == {"raises": True, "is_stub": True}


def test_rng_tracker_on_cpu_generator(paths):
    for r in paths:
        obs = r["rng_tracker_on_cpu_generator"]
        assert obs["outside_unchanged"] and obs["advances"] and obs["reproducible"]
        assert 0 < obs["dropped"] < 64


def test_device_factories_model(paths):
    for r in paths:
        obs = r["device_factories_model"]
        assert obs["finite"] and obs["logits_shape"] == (2, compat_workers.W.SEQ, compat_workers.W.VOCAB // 2)
        assert obs["gather_ok"] and obs["gather_shape"] == (3, 6)


def test_pipeline_schedules(paths):
    losses = [r["pipeline_schedules"]["losses"] for r in paths]
    assert losses[0] == losses[1] and len(losses[0]) == 2


def test_tied_embedding_tensor_cuda(paths):
    # the tied copies on the first and last stage stay identical after two updates
    assert paths[0]["tied_embedding_tensor_cuda"]["tied_weight_norm"] == pytest.approx(
        paths[1]["tied_embedding_tensor_cuda"]["tied_weight_norm"], rel=1e-6)


def test_ddp_and_optimizer_devices(paths):
    for r in paths:
        obs = r["ddp_and_optimizer_devices"]
        assert obs["main_grad_synced"] and obs["grad_norm"] > 0


def test_cuda_type_checks(paths):
    obs = paths[0]["cuda_type_checks"]
    assert obs["optimizer"] == ["FP32Optimizer"]
    assert paths[0]["distopt_torch_adam_checkpoint"]["optimizer"] == "DistributedOptimizer"
    assert obs["clipped"] == pytest.approx([0.5] * 4, rel=1e-5)  # 2.0 * 1/(4 + 1e-6)


def test_dist_checkpointing_devices(paths):
    assert any(f.endswith(".distcp") for f in paths[0]["dist_checkpointing_devices"]["files"])


def test_distopt_dp_zero_gather_cuda(paths):
    for r in paths:
        assert r["distopt_dp_zero_gather_cuda"]["dp_zero_upstream_fails"]
    assert any(f.endswith(".distcp") for f in paths[0]["distopt_dp_zero_gather_cuda"]["files"])  # the patched save


def test_gpt_model_deprecation_logged_once(paths):
    assert paths[0]["gpt_model_deprecation_logged_once"] == {"upstream": 2, "patched": 0}


def test_param_groups_aligned_over_the_role(paths):
    assert [r["param_groups_aligned_over"]["built"] for r in paths] == ["ChainedOptimizer", None]
    assert all(r["param_groups_aligned_over"]["torch_restored"] for r in paths)


def test_distopt_torch_adam_checkpoint(paths):
    for r in paths:
        obs = r["distopt_torch_adam_checkpoint"]
        assert obs["fresh_upstream_fails"] and set(obs["fresh_step"]) == {0}
        assert obs["steps"] == [2.0] and obs["steps_unshared"]
        assert obs["set_upstream_fails"] and obs["set_upstream_grad_fails"] and obs["params_restored"]


_CUDA_PROBE = """
import json, torch
torch.cuda.is_available = lambda: True
from camopd_megatron import compat
compat.install()
import megatron.core.optimizer.distrib_optimizer as dopt
import megatron.core.tensor_parallel.random as rng
import megatron.core.utils as mu
print(json.dumps({"applied": list(compat.applied_patches()),
                  "rng_untouched": rng._get_cuda_rng_state.__module__ == rng.__name__,
                  "torch_untouched": mu.torch is torch,
                  "adam_fixed": hasattr(dopt.DistributedOptimizer.load_state_dict, "__wrapped__")}))
"""


def test_with_cuda_only_the_cuda_independent_patches_are_applied():
    """A GPU process without TE/apex keeps megatron's CUDA paths but gets the torch-Adam fixes (and the gloo
    wrappers, which check the group's backend at each call)."""
    out = subprocess.run([sys.executable, "-c", _CUDA_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"applied": ["distopt_torch_adam_checkpoint", "gloo_uneven_first_dim_collectives",
                               "gpt_model_deprecation_logged_once"],
                   "rng_untouched": True, "torch_untouched": True, "adam_fixed": True}


def test_moe_cuda_devices(paths):
    for r in paths:
        for dispatcher in ("alltoall", "allgather"):
            obs = r["moe_cuda_devices"][dispatcher]
            assert obs == {"finite": True, "router_grad": True, "device": "cpu"}, (dispatcher, obs)


def test_gloo_uneven_first_dim_collectives(paths):
    for r in paths:
        obs = r["gloo_uneven_first_dim_collectives"]
        assert obs["finite"] and obs["router_grad"]
    assert paths[0]["gloo_uneven_first_dim_collectives"]["logits_sum"] == paths[1]["gloo_uneven_first_dim_collectives"]["logits_sum"]
