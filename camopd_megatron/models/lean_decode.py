"""A lean incremental decoder for rollouts of a TP = 1, PP = 1 student (megatron local layer spec).

Why: megatron's inference path costs ~11 ms per decode step on the benchmark's small model on CPU,
against ~4.6 ms for Hugging Face ``generate`` (BENCHMARKS.md, "End-to-end step vs TRL"). Most of it is
not matmuls: RoPE cos/sin recomputed per layer and step, a copy of the whole KV cache to expand GQA
groups, and autograd-function wrappers around every linear. This decoder runs the SAME parameters
(read from the GPTModel's modules, never copied) with precomputed RoPE tables, a preallocated KV
cache and ``scaled_dot_product_attention(enable_gqa=True)``. Reading the weights directly skips the
modules' forward pre-hooks, so construction runs them first (``models.gpt.finish_param_gather``: with
``parallel.overlap_param_gather`` that is where megatron DDP waits for the updated weights).

Math (identical to the local spec, fp32 statistics as there): per layer
    h = RMSNorm_in(x); [q | k | v] per query group = h W_qkv (+ b); q, k ← RMSNorm_qk (qwen3);
    q, k ← RoPE (rotate-half, megatron's non-interleaved layout); attn = softmax(q kᵀ / √d) v (causal);
    x += attn W_proj;  x += (silu(h2 W_gate) * h2 W_up) W_fc2 with h2 = RMSNorm_mlp(x)
then logits = RMSNorm_final(x) W_out. ``tests/test_rollout.py`` checks the tokens and μ against
megatron's own forward.

Packed weights (CPU, fp32): a decode step multiplies B rows by every weight, and at small B MKL's
ordinary GEMM repacks the weight on every call: at B = 8 the [151,936, 256] output product took 42 ms
against 12 ms to read the weight once. Each linear weight is therefore packed once per rollout for the
micro-batch's row count, and the decode steps run on the packed copy: 16 ms for that product with MKL's
packed GEMM (``torch.ops.mkl._mkl_reorder_linear_weight``) on an Intel CPU. On an AMD CPU MKL's small-row
products run slower paths (27-29 ms packed), and oneDNN's packed product
(``torch.ops.mkldnn._reorder_linear_weight``) takes 19-21 ms, with a cheaper packing; which library packs
is a fixed rule of the CPU vendor (:func:`default_packer`; BENCHMARKS.md). Products over another row
count (the prefill, B x prompt rows) take the ordinary path. The packs live as long as the rollout
(:class:`WeightPacks`, held by its caller): one more copy of each weight or more (oneDNN's packed output
weight on an AMD CPU 1.04x its bytes, MKL's 2.5x on an Intel CPU). Only the rounding of the products
changes (another summation order).

Only used when :func:`supported` says the model is exactly this architecture; otherwise rollout
keeps megatron's StaticInferenceContext path. Shapes: B batch, n fed tokens, S cache length, G kv
groups, H query heads, D head dim, V (padded) vocab.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from camopd_megatron.models.gpt import finish_param_gather, output_weight

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection


def supported(model: torch.nn.Module, pg_collection: "ProcessGroupCollection") -> bool:
    """True for a TP = 1, PP = 1 local-spec GPTModel of our Llama-family builder."""
    import torch.distributed as dist

    for name in ("tp", "pp"):
        group = getattr(pg_collection, name, None)
        if group is not None and dist.get_world_size(group) != 1:
            return False
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "decoder") or not hasattr(model, "rotary_pos_emb"):
        return False
    layer0 = model.decoder.layers[0] if len(model.decoder.layers) else None
    return (
        layer0 is not None
        and getattr(model, "pre_process", False) and getattr(model, "post_process", False)
        and cfg.normalization == "RMSNorm" and cfg.gated_linear_unit and not cfg.add_bias_linear
        and cfg.activation_func is F.silu and cfg.num_moe_experts is None and not cfg.sequence_parallel
        and not getattr(cfg, "multi_latent_attention", False) and not model.rotary_pos_emb.rotary_interleaved
        and isinstance(layer0.input_layernorm, torch.nn.RMSNorm)
        and isinstance(layer0.pre_mlp_layernorm, torch.nn.RMSNorm)
        and getattr(cfg, "fp8", None) is None
    )


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _norm(norm: torch.nn.RMSNorm) -> tuple[torch.Tensor, float]:
    eps = norm.eps if norm.eps is not None else torch.finfo(norm.weight.dtype).eps
    return norm.weight, eps


@functools.lru_cache(maxsize=None)
def _cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The x86 vendor string of this machine's CPU ("GenuineIntel", "AuthenticAMD"; "" where unknown)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


class _Packer(NamedTuple):
    """One library's packed GEMM: whether this torch has it, how it packs a weight for a row count, and
    x Wᵀ (+ b) on the pack (``linear(x, packed, weight, bias, rows)``)."""

    available: Callable[[], bool]
    reorder: Callable[[torch.Tensor, int], torch.Tensor]
    linear: Callable[..., torch.Tensor]


def _onednn_linear(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   rows: int) -> torch.Tensor:
    if x.numel() != rows * x.shape[-1]:  # a oneDNN pack is only used at its rows (MKL falls back by itself)
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


_PACKERS = {
    "mkl": _Packer(
        lambda: torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"),
        lambda w, rows: torch.ops.mkl._mkl_reorder_linear_weight(w, rows),
        lambda x, packed, w, b, rows: torch.ops.mkl._mkl_linear(x, packed, w, b, rows)),
    "onednn": _Packer(
        lambda: torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"),
        lambda w, rows: torch.ops.mkldnn._reorder_linear_weight(w, rows),
        _onednn_linear),
}


def _packer_available(library: str) -> bool:
    if library not in _PACKERS:
        raise ValueError(f"weight packing library {library!r}: expected one of {sorted(_PACKERS)}")
    return _PACKERS[library].available()


def default_packer() -> Optional[str]:
    """Which library packs the decode weights on this machine, or None (no packing): MKL on Intel CPUs and
    where the vendor is unknown, oneDNN on AMD CPUs (module docstring). A fixed rule, not a timing, so every
    run on one machine rounds its products the same way (a resumed run samples the same tokens)."""
    preferred = ("onednn", "mkl") if _cpu_vendor() == "AuthenticAMD" else ("mkl",)
    return next((lib for lib in preferred if _packer_available(lib)), None)


class WeightPacks:
    """Packed copies of the decoder's weights for one row count, made on first use and kept for the
    rollout (every micro-batch of the same size reuses them; the weights do not change within a rollout).
    ``library``: "mkl" or "onednn" (default: :func:`default_packer`). Weights that cannot be packed (not
    CPU fp32, or torch without that library) are left to ``F.linear``, and so is every weight with
    ``pack=False`` (a caller whose products have many rows: a teacher extending its cache)."""

    def __init__(self, pack: bool = True, library: Optional[str] = None) -> None:
        self._packs: dict[tuple[int, int], torch.Tensor] = {}
        self.library = library if library is not None else default_packer()
        available = self.library is not None and _packer_available(self.library)  # an unknown name raises
        self.enabled = pack and available

    def linear(self, weight: torch.Tensor, bias: Optional[torch.Tensor], rows: int) -> "_Linear":
        if not (self.enabled and weight.device.type == "cpu" and weight.dtype == torch.float32
                and weight.dim() == 2 and rows > 0):
            return _Linear(weight, bias, None, rows, "")
        key = (id(weight), rows)
        if key not in self._packs:
            self._packs[key] = _PACKERS[self.library].reorder(weight.detach(), rows)
        return _Linear(weight, bias, self._packs[key], rows, self.library)


class _Linear(NamedTuple):
    """x Wᵀ (+ b): on the packed weight when the product has the rows it was packed for; any other row
    count takes the ordinary product."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    packed: Optional[torch.Tensor]
    rows: int
    library: str  # a key of _PACKERS, or "" (not packed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return _PACKERS[self.library].linear(x, self.packed, self.weight, self.bias, self.rows)


class _Layer(NamedTuple):
    """One transformer layer's parameters, looked up once."""

    input_norm: tuple[torch.Tensor, float]
    qkv: _Linear
    qk_norms: Optional[tuple[torch.nn.Module, torch.nn.Module]]  # qwen3's q/k RMSNorm modules
    proj: _Linear
    mlp_norm: tuple[torch.Tensor, float]
    fc1: _Linear
    fc2: _Linear


class LeanDecoder:
    """KV-cached decoding of one micro-batch (``logits(tokens, start)`` like megatron's context path).

    Per-layer parameters are looked up once here (not through module attributes every step), the input
    and MLP norms are called as ``torch.rms_norm``, and q and k are rotated in one call: in megatron's
    fused QKV layout each kv group holds its query heads then its key head, adjacent."""

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int, packs: Optional[WeightPacks] = None) -> None:
        # every weight is read directly, never through a module's forward: wait for megatron DDP's
        # pending parameter all-gathers (parallel.overlap_param_gather) as the forward pre-hooks would
        finish_param_gather(model)
        cfg = model.config
        self.model = model
        self.heads, self.groups, self.dim = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
        self.per_group = self.heads // self.groups
        freqs_SD = model.rotary_pos_emb.get_emb(max_len)[:, 0, 0, :].float()
        dtype = model.embedding.word_embeddings.weight.dtype
        self.cos_SD, self.sin_SD = freqs_SD.cos().to(dtype), freqs_SD.sin().to(dtype)
        layers = len(model.decoder.layers)
        device = model.embedding.word_embeddings.weight.device
        self.k_LBGSD = torch.zeros(layers, batch, self.groups, max_len, self.dim, dtype=dtype, device=device)
        self.v_LBGSD = torch.zeros_like(self.k_LBGSD)
        self.embed = model.embedding.word_embeddings.weight
        self.final_norm = _norm(model.decoder.final_layernorm)
        packs = packs if packs is not None else WeightPacks()
        self.out = packs.linear(output_weight(model), None, batch)  # one decode step: B rows
        self.layers = []
        for layer in model.decoder.layers:
            att, mlp = layer.self_attention, layer.mlp
            q_ln = getattr(att, "q_layernorm", None)
            self.layers.append(_Layer(
                _norm(layer.input_layernorm), packs.linear(att.linear_qkv.weight, att.linear_qkv.bias, batch),
                (q_ln, att.k_layernorm) if q_ln is not None else None,
                packs.linear(att.linear_proj.weight, att.linear_proj.bias, batch),
                _norm(layer.pre_mlp_layernorm), packs.linear(mlp.linear_fc1.weight, None, batch),
                packs.linear(mlp.linear_fc2.weight, None, batch),
            ))

    def _attention(self, i: int, x_BnC: torch.Tensor, start: int) -> torch.Tensor:
        p = self.layers[i]
        b, n, c = x_BnC.shape
        h_BnC = torch.rms_norm(x_BnC, (c,), *p.input_norm)
        qkv = p.qkv(h_BnC).view(b, n, self.groups, self.per_group + 2, self.dim)
        cos, sin = self.cos_SD[start:start + n, None, None, :], self.sin_SD[start:start + n, None, None, :]
        if p.qk_norms is None:  # rotate the query heads and the key head of every group in one call
            qk = _rotate(qkv[:, :, :, : self.per_group + 1], cos, sin)
            q, k = qk[:, :, :, : self.per_group], qk[:, :, :, self.per_group]
        else:
            q = p.qk_norms[0](qkv[:, :, :, : self.per_group].reshape(b, n, self.heads, self.dim))
            k = p.qk_norms[1](qkv[:, :, :, self.per_group])
            q, k = _rotate(q, cos[:, :, 0], sin[:, :, 0]), _rotate(k, cos[:, :, 0], sin[:, :, 0])
        v = qkv[:, :, :, self.per_group + 1]
        q = q.reshape(b, n, self.heads, self.dim)  # head g*per_group + j belongs to kv group g
        end = start + n
        self.k_LBGSD[i, :, :, start:end] = k.transpose(1, 2)
        self.v_LBGSD[i, :, :, start:end] = v.transpose(1, 2)
        keys, values = self.k_LBGSD[i, :, :, :end], self.v_LBGSD[i, :, :, :end]
        mask = None
        if n > 1:  # query at position start+r sees keys 0..start+r
            mask = torch.ones(n, end, dtype=torch.bool, device=x_BnC.device).tril(diagonal=start)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim)
        return p.proj(out)

    def _layers(self, tokens_Bn: torch.Tensor, start: int) -> torch.Tensor:
        x = F.embedding(tokens_Bn, self.embed)
        c = x.shape[-1]
        for i, p in enumerate(self.layers):
            x = x + self._attention(i, x, start)
            gate, up = p.fc1(torch.rms_norm(x, (c,), *p.mlp_norm)).chunk(2, dim=-1)
            x = x + p.fc2(F.silu(gate) * up)
        return x

    @torch.no_grad()
    def logits(self, tokens_Bn: torch.Tensor, start: int) -> torch.Tensor:
        """Feed positions [start, start + n); logits ``[B, V]`` of the last one."""
        x = self._layers(tokens_Bn, start)
        w, eps = self.final_norm
        return self.out(torch.rms_norm(x[:, -1], (x.shape[-1],), w, eps))

    @torch.no_grad()
    def hidden(self, tokens_Bn: torch.Tensor, start: int) -> torch.Tensor:
        """Feed positions [start, start + n); the final hidden states ``[B, n, C]`` of all of them (after the
        final norm: what the output layer multiplies, as the GPTModel's decoder returns them)."""
        x = self._layers(tokens_Bn, start)
        w, eps = self.final_norm
        return torch.rms_norm(x, (x.shape[-1],), w, eps)
