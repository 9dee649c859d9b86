"""models/precision.py: the exact TransformerConfig kwargs per FP8 recipe, every error, teachers.

CPU tests pass ``te_available=True`` and a compute capability, as the GPU path would detect them,
and feed the kwargs to megatron-core's real ``TransformerConfig``. The GPU test (skipped without
CUDA + transformer-engine) compares an FP8 student's sampled-token log-probs with BF16.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from camopd_megatron.config import ConfigError, ModelConfig, PrecisionConfig, TeacherConfig
from camopd_megatron.models.precision import (
    ddp_precision_kwargs,
    precision_kwargs,
    teacher_precision_kwargs,
)

HOPPER = (9, 0)
BLACKWELL = (10, 0)
BF16 = {"params_dtype": torch.bfloat16, "bf16": True, "fp16": False}


def _kw(fp8=None, recipe="delayed", *, device="cuda", te=True, cc=HOPPER, impl="auto", dtype="auto", fp8_param=None):
    prec = PrecisionConfig(params_dtype=dtype, fp8=fp8, fp8_recipe=recipe)
    if fp8_param is not None:  # the section may grow this field; the function reads it when present
        prec = SimpleNamespace(params_dtype=dtype, fp8=fp8, fp8_recipe=recipe, fp8_param=fp8_param)
    return precision_kwargs(prec, ModelConfig(transformer_impl=impl), device_type=device, te_available=te, compute_capability=cc)


def test_no_fp8_dtypes():
    assert _kw(device="cpu", te=False, cc=None) == {"params_dtype": torch.float32, "bf16": False, "fp16": False}
    assert _kw() == BF16
    assert _kw(dtype="fp16") == {"params_dtype": torch.float16, "bf16": False, "fp16": True}
    assert _kw(dtype="fp32") == {"params_dtype": torch.float32, "bf16": False, "fp16": False}
    assert _kw(dtype="bf16", device="cpu", te=False, cc=None) == BF16


EXPECTED = {
    "delayed": {**BF16, "fp8": "hybrid", "fp8_recipe": "delayed", "fp8_param": False, "fp8_margin": 0,
                "fp8_amax_history_len": 1024, "fp8_amax_compute_algo": "max"},
    "tensorwise": {**BF16, "fp8": "hybrid", "fp8_recipe": "tensorwise", "fp8_param": False, "fp8_margin": 0},
    "blockwise": {**BF16, "fp8": "hybrid", "fp8_recipe": "blockwise", "fp8_param": False, "fp8_margin": 0},
    "mxfp8": {**BF16, "fp8": "hybrid", "fp8_recipe": "mxfp8", "fp8_param": False, "fp8_margin": 0},
}


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_fp8_kwargs_exact(recipe):
    cc = BLACKWELL if recipe == "mxfp8" else HOPPER
    assert _kw("hybrid", recipe, cc=cc) == EXPECTED[recipe]


def test_fp8_e4m3_param_and_ada():
    got = _kw("e4m3", "tensorwise", cc=(8, 9), fp8_param=True)
    assert got == {**EXPECTED["tensorwise"], "fp8": "e4m3", "fp8_param": True}
    assert _kw("hybrid", "delayed", impl="te") == EXPECTED["delayed"]
    fp8_on = SimpleNamespace(fp8="hybrid", fp8_param=True)
    assert ddp_precision_kwargs(fp8_on) == {"grad_reduce_in_fp32": True, "fp8_param_gather": True}
    assert ddp_precision_kwargs(PrecisionConfig()) == {"grad_reduce_in_fp32": True, "fp8_param_gather": False}


def test_megatron_receives_the_kwargs():
    """Each recipe's kwargs build megatron-core 0.19.2's TransformerConfig with exactly those values."""
    from camopd_megatron import compat

    compat.install()
    from megatron.core.transformer.transformer_config import TransformerConfig

    for recipe, expected in EXPECTED.items():
        cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, **expected)
        for key, value in expected.items():
            assert getattr(cfg, key) == value, (recipe, key)
        if recipe != "delayed":  # megatron's own defaults for the recipes without amax history
            assert (cfg.fp8_amax_history_len, cfg.fp8_amax_compute_algo) == (1, "most_recent")


def _error(**kw) -> str:
    with pytest.raises(ConfigError) as e:
        _kw(**kw)
    return str(e.value)


def test_errors_name_key_and_fix():
    msg = _error(fp8="hybrid", te=False)
    assert "precision.fp8" in msg and 'pip install "transformer-engine[pytorch]"' in msg and "container" in msg
    msg = _error(fp8="hybrid", device="cpu", te=False, cc=None)
    assert "precision.fp8" in msg and "cpu" in msg and "precision.fp8=null" in msg
    assert "2 config problems" in msg  # CPU and no TE, reported together
    msg = _error(fp8="hybrid", cc=(8, 0))
    assert "precision.fp8" in msg and "8.9" in msg and "8.0" in msg
    msg = _error(fp8="hybrid", recipe="mxfp8", cc=HOPPER)
    assert "precision.fp8_recipe" in msg and "10.0" in msg and "Blackwell" in msg
    msg = _error(fp8="hybrid", recipe="blockwise", cc=(8, 9))
    assert "precision.fp8_recipe" in msg and "9.0" in msg
    msg = _error(fp8="hybrid", impl="local")
    assert "precision.fp8" in msg and "model.transformer_impl" in msg
    msg = _error(fp8="e5m2")
    assert "precision.fp8" in msg and "e4m3" in msg
    msg = _error(fp8="hybrid", recipe="custom")
    assert "precision.fp8_recipe" in msg
    with pytest.raises(ConfigError, match="precision.fp8_param"):
        _kw(fp8=None, fp8_param=True)


def test_capability_unknown_is_not_checked():
    assert _kw("hybrid", "mxfp8", cc=None) == EXPECTED["mxfp8"]


def test_teachers_never_fp8():
    t = TeacherConfig(name="g", branches=["general"])
    assert teacher_precision_kwargs(t, "cuda") == {**BF16, "fp8": None}
    assert teacher_precision_kwargs(t, "cpu") == {"params_dtype": torch.float32, "bf16": False, "fp16": False, "fp8": None}
    t16 = TeacherConfig(name="d", branches=["domain"], dtype="fp16")
    assert teacher_precision_kwargs(t16, "cuda")["params_dtype"] == torch.float16
    assert teacher_precision_kwargs(TeacherConfig(name="x", dtype="bf16"), "cpu")["bf16"] is True


# ------------------------------------------------------------------------------------------ GPU
def _gpu_fp8_ready() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU"
    from camopd_megatron.deps import te_available

    if not te_available():
        return False, "needs transformer-engine"
    if torch.cuda.get_device_capability() < (8, 9):
        return False, "needs compute capability >= 8.9 for FP8"
    return True, ""


_READY, _WHY = _gpu_fp8_ready()


@pytest.mark.gpu
@pytest.mark.te
@pytest.mark.skipif(not _READY, reason=_WHY or "ok")
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_fp8_student_logprobs_close_to_bf16(recipe):
    """A tiny TE student: FP8 sampled-token log-probs within 0.05 nats (mean abs) of BF16, same weights."""
    from camopd_megatron.models.precision import FP8_RECIPES

    cc = torch.cuda.get_device_capability()
    if cc < FP8_RECIPES[recipe] or (recipe == "mxfp8" and cc >= (12, 0)):
        pytest.skip(f"{recipe} needs compute capability {FP8_RECIPES[recipe]} (this GPU: {cc})")
    if recipe == "blockwise" and float(torch.version.cuda or 0) < 12.9:
        pytest.skip("blockwise FP8 needs CUDA >= 12.9")
    from camopd_megatron.distributed import destroy_distributed, init_distributed
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng
    from camopd_megatron.models.groups import simple_pg_collection
    from camopd_megatron.models.logprobs import next_token_logprobs

    init_distributed()
    try:
        pgc = simple_pg_collection(1, 1, 1)
        model_cfg = ModelConfig(
            init="random", num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=512,
            vocab_size=1024, seq_length=128, transformer_impl="te", init_method_std=0.05,
        )
        cc_now = torch.cuda.get_device_capability()

        def build(fp8):
            prec = PrecisionConfig(params_dtype="bf16", fp8=fp8, fp8_recipe=recipe)
            extra = precision_kwargs(prec, model_cfg, device_type="cuda", te_available=True, compute_capability=cc_now)
            init_model_rng(1234, pgc)
            return build_gpt_model(model_cfg, pgc, params_dtype=torch.bfloat16, config_extra=extra).eval()

        ref, fp8 = build(None), build("hybrid")
        weights = {k: v for k, v in ref.state_dict().items() if not k.endswith("_extra_state")}
        missing, unexpected = fp8.load_state_dict(weights, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)

        gen = torch.Generator(device="cuda").manual_seed(0)
        tokens = torch.randint(0, model_cfg.vocab_size, (4, model_cfg.seq_length), device="cuda", generator=gen)
        pos = torch.arange(model_cfg.seq_length, device="cuda").unsqueeze(0).expand_as(tokens)
        with torch.no_grad():
            logits_ref = ref(tokens, pos, None)
            # tokens sampled from the BF16 student: the sampled-token log-probs of a rollout
            probs = torch.softmax(logits_ref.float()[..., : model_cfg.vocab_size], dim=-1)
            sampled = torch.multinomial(probs.view(-1, model_cfg.vocab_size), 1, generator=gen).view_as(tokens)
            seq = torch.cat([tokens[:, :1], sampled[:, :-1]], dim=1)
            for _ in range(3):  # let delayed scaling fill its amax history
                fp8(seq, pos, None)
            lp_ref = next_token_logprobs(ref(seq, pos, None), seq, None, vocab_size=model_cfg.vocab_size)[:, :-1]
            lp_fp8 = next_token_logprobs(fp8(seq, pos, None), seq, None, vocab_size=model_cfg.vocab_size)[:, :-1]
        diff = (lp_fp8 - lp_ref).abs().mean().item()
        assert torch.isfinite(lp_fp8).all()
        assert diff < 0.05, f"{recipe}: mean |FP8 - BF16| log-prob = {diff:.4f} nats"
    finally:
        destroy_distributed()
