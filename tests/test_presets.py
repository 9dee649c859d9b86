"""The algorithm presets under examples/configs/ load and mean what docs/algorithm.md §7 says."""
import os

import pytest
import torch
import yaml

from camopd_megatron.config import Config, load_config
from camopd_megatron.distill.scheduler import BranchScheduler
from camopd_megatron.distill.selection import SelectionPolicy, plan_selection

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "configs")
G3D = ["general", "general", "general", "domain"]
# name → (mode, pattern or shares, selection.enabled, adv_scale, scale_only_selected)
EXPECTED = {
    "camopd": ("alternating", G3D, True, {"general": 2.0, "domain": 1.0}, True),
    "vanilla_mopd": ("mixed", {"general": 1.0, "domain": 1.0}, False, {"general": 1.0, "domain": 1.0}, False),
    "no_selection": ("alternating", G3D, False, {"general": 2.0, "domain": 1.0}, True),
    "no_selection_no_scaling": ("alternating", G3D, False, {"general": 1.0, "domain": 1.0}, True),
    "no_decoupling": ("mixed", {"general": 3.0, "domain": 1.0}, False, {"general": 1.0, "domain": 1.0}, True),
}


def path(name):
    return os.path.join(CONFIGS, f"{name}.yaml")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_semantics(name):
    cfg = load_config(path(name), ["rollout.prompts_per_step=8"])
    mode, sched, enabled, adv, scale_only = EXPECTED[name]
    assert cfg.scheduler.mode == mode
    if mode == "alternating":
        assert cfg.scheduler.pattern == sched
    else:
        assert cfg.scheduler.mixed_shares == sched
    assert cfg.selection.enabled is enabled and cfg.selection.scale_only_selected is scale_only
    assert cfg.loss.adv_scale == adv
    assert cfg.selection.rho == {"general": 0.8, "domain": 0.8}
    assert cfg.selection.score == {"general": "abs", "domain": "positive"}
    assert (cfg.loss.is_low, cfg.loss.is_high, cfg.loss.is_mode, cfg.loss.adv_clip) == (0.5, 2.0, "mask", None)
    # the presets only override their base
    if name != "camopd":
        own = yaml.safe_load(open(path(name)))
        assert own["base"].endswith(".yaml") and set(own) - {"base"} <= {"scheduler", "selection", "loss"}

    # what one step does under the preset: 4 general samples, scores 0.1/0.5/0.3/0.1
    sched_obj = BranchScheduler.from_config(cfg)
    plan = sched_obj.plan(0)
    assert plan == ({"general": 8} if mode == "alternating" else {"general": 8 * sched["general"] // sum(map(int, sched.values())),
                                                                   "domain": 8 * sched["domain"] // sum(map(int, sched.values()))})
    res = plan_selection(torch.tensor([0.1, 0.5, 0.3, 0.1]), torch.arange(4), ["general"] * 4,
                         SelectionPolicy.from_config(cfg.selection, cfg.loss), None)
    expected_keep = [False, True, True, False] if enabled else [True] * 4
    r = adv["general"]
    expected_scale = [1.0, r, r, 1.0] if scale_only else [r] * 4
    assert res.keep_B.tolist() == expected_keep and res.adv_scale_B.tolist() == expected_scale


def test_camopd_is_the_default_algorithm():
    """camopd.yaml restates the built-in defaults of the algorithm sections (no hidden divergence)."""
    preset, default = load_config(path("camopd")), Config()
    for section in ("scheduler", "selection", "loss"):
        assert getattr(preset, section) == getattr(default, section), section
