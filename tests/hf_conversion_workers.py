"""Rank functions and shared helpers of tests/test_hf_conversion.py and tests/test_end_to_end_hf.py, in a
module that does not import transformers at import time (spawned ranks import the function's module;
transformers would add seconds per rank)."""
from __future__ import annotations

import torch

from camopd_megatron.checkpoint.hf import model_config_from_hf
from camopd_megatron.checkpoint.hf_io import read_hf_config

T, NEW = 10, 16
"""Prompt length and greedy tokens."""
VOCAB = 100


def tokens() -> torch.Tensor:
    """The fixed prompt batch [2, T]."""
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(11))


def hf_tensors(d) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files of HF model directory ``d``."""
    from pathlib import Path

    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def save_tiny_tokenizer(d, vocab_size: int) -> None:
    """A byte-level BPE fast tokenizer (no merges: one token per character): ``<|end|>`` (id 0, eos),
    ``<pad>`` (id 1, pad), then byte-level characters (``Ġ`` is the space). Byte-level, so that the model
    type's own tokenizer class (Qwen2Tokenizer, which transformers 5 picks from config.json) reads it as is."""
    import transformers
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers

    chars = ["Ġ"] + [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ċ", "ĉ"]
    vocab = {"<|end|>": 0, "<pad>": 1, **{c: i + 2 for i, c in enumerate(chars[: vocab_size - 2])}}
    tok = Tokenizer(tok_models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<pad>")
    fast.save_pretrained(d)


TINY_QWEN2 = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False)
"""A tiny Qwen2 (GQA, untied embeddings) for the end-to-end tests."""


def save_tiny_qwen2(path, seed: int) -> None:
    """A :data:`TINY_QWEN2` Hugging Face model directory with its tokenizer (weights perturbed by ``seed``)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**TINY_QWEN2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    save_tiny_tokenizer(path, TINY_QWEN2["vocab_size"])


def parity_worker(rank: int, world_size: int, cases: dict, resave: str) -> dict:
    import torch.distributed as dist

    from camopd_megatron.checkpoint.dist import load_model, model_sharded_state_dict, save_checkpoint
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng
    from camopd_megatron.models.groups import simple_pg_collection
    from camopd_megatron.models.pipeline import model_forward

    def full_logits(model, batch, pgc, vocab):
        with torch.no_grad():
            lg = model_forward(model, batch)
        parts = [torch.empty_like(lg) for _ in range(dist.get_world_size(pgc.tp))]
        dist.all_gather(parts, lg.contiguous(), group=pgc.tp)
        return torch.cat(parts, -1)[..., :vocab]

    out: dict = {}
    prompt = tokens()
    for name, m in cases.items():
        cfg = model_config_from_hf(read_hf_config(m["hf"]))
        for tp in (1, 2):
            pgc = simple_pg_collection(tp, 1, world_size // tp)
            init_model_rng(99, pgc)
            model = build_gpt_model(cfg, pgc)
            load_model(model, m["ckpt"], model_cfg=cfg, pg_collection=pgc)
            out[(name, tp)] = (full_logits(model, prompt, pgc, cfg.vocab_size) - m["logits"]).abs().max().item()
        # greedy decoding by full recompute at TP=2
        seq = prompt[:1]
        for _ in range(NEW):
            nxt = full_logits(model, seq, pgc, cfg.vocab_size)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        out[(name, "gen")] = seq[0, T:].tolist()
        if name == "qwen2":  # a TP=2 training-style save, to export from another layout
            save_checkpoint(resave, model_sharded_state_dict(model, pgc), model_cfg=cfg)
    return out


def export_worker(rank: int, world_size: int, jobs: list) -> None:
    from camopd_megatron.checkpoint.hf_io import convert_megatron_to_hf

    for src, dst, kw in jobs:
        convert_megatron_to_hf(src, dst, progress=False, **kw)


MOE_LAYOUTS = ((1, 1, 1, None), (2, 1, 1, None), (1, 1, 2, None), (2, 1, 2, 1), (1, 2, 1, None))
"""(tp, pp, ep, etp) the MoE parity test loads each converted checkpoint at, on 2 ranks (TP > 1 with sequence
parallelism, as megatron-core runs MoE layers; TP = 2 x EP = 2 with expert-TP 1)."""


def moe_parity_worker(rank: int, world_size: int, cases: dict, resave: dict) -> dict:
    """Per case and layout of :data:`MOE_LAYOUTS`: max |logits - transformers'| (PP = 1) and max |next-token
    log-prob - transformers'| (every layout, PP = 2 included); ``resave`` names the cases also saved at
    TP = 1 x EP = 2 (a training-style save, exported again by the test)."""
    import torch.distributed as dist

    from camopd_megatron.checkpoint.dist import load_model, model_sharded_state_dict, save_checkpoint
    from camopd_megatron.models.gpt import build_gpt_model, init_model_rng
    from camopd_megatron.models.groups import simple_pg_collection
    from camopd_megatron.models.pipeline import model_forward
    from camopd_megatron.models.scoring import score_logprobs

    out: dict = {}
    prompt = tokens()
    mask = torch.ones(prompt.shape)
    for name, m in cases.items():
        cfg = model_config_from_hf(read_hf_config(m["hf"]))
        ref = m["logits"].log_softmax(-1)[:, :-1].gather(-1, prompt[:, 1:, None])[..., 0]
        for tp, pp, ep, etp in MOE_LAYOUTS:
            pgc = simple_pg_collection(tp, pp, world_size // (tp * pp), ep=ep, etp=etp)
            init_model_rng(99, pgc)
            model = build_gpt_model(cfg, pgc, sequence_parallel=tp > 1)
            load_model(model, m["ckpt"], model_cfg=cfg, pg_collection=pgc)
            model.eval()
            if pp == 1:
                with torch.no_grad():
                    lg = model_forward(model, prompt)
                parts = [torch.empty_like(lg) for _ in range(tp)]
                dist.all_gather(parts, lg.contiguous(), group=pgc.tp)
                full = torch.cat(parts, -1)[..., :cfg.vocab_size]
                out[(name, tp, pp, ep, "logits")] = (full - m["logits"]).abs().max().item()
            logp = score_logprobs(model, pgc, prompt, mask, micro_batch=None, vocab_size=cfg.vocab_size)
            out[(name, tp, pp, ep, "logp")] = (logp[:, :-1] - ref).abs().max().item()
            if name in resave and (tp, pp, ep) == (1, 1, 2):
                save_checkpoint(resave[name], model_sharded_state_dict(model, pgc), model_cfg=cfg)
    return out
