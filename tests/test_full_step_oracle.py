"""A full-step oracle: our training steps against an independent reference, step by step.

``tests/test_trainer.py`` checks self-consistency (resume, DP2 = DP1, PP2 = PP1); those checks would
still pass if training used every row instead of the kept ones, or dropped r_i. Here the reference
is a Hugging Face ``transformers`` model loaded from the same checkpoint our student starts from
(its conversion), fed the tokens, μ and teacher log-probs our steps recorded (``train(...,
on_step=...)``), and trained with the algorithm as docs/algorithm.md states it, written from that
page and not from our code (nothing of ``camopd_megatron.distill`` / ``ops`` is used below):
pre-update gaps, ρ-mass selection per branch (ties: lower sample index), r_b (``scale_mode:
advantage``), the truncated IS mask, token mean per sequence, the global |S| normaliser, global-norm
gradient clipping, and AdamW with megatron's no-decay rule (biases and 1-D tensors) and our lr schedule.

One full G,G,G,D period (4 steps) for every preset of ``examples/configs`` from a student that differs
from both teachers, at DP = 2 and at TP = 2: the same kept samples at every step, losses within 1e-5,
the same pre-clip gradient norm, and every parameter tensor's update (after − before) within 1e-3 of
the reference's, relative to its norm.

μ is constructed (:func:`_rollout_with_set_ratios`, wrapping the step's rollout) so that some IS
ratios π/μ are exactly 0.5 and 2.0 in our float32 arithmetic (the window is inclusive), others
clearly outside or inside it. The reference's π differs from ours by float noise (~1e-6), so it
treats a ratio within ``_ON_BOUND`` of a bound as on it; no other ratio comes near a bound (checked).
"""
from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from camopd_megatron.checkpoint.hf_io import convert_hf_to_megatron, convert_megatron_to_hf  # noqa: E402
from camopd_megatron.testing.multiproc import run_on_ranks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESETS = ("camopd", "vanilla_mopd", "no_selection", "no_selection_no_scaling", "no_decoupling")
SHAPE = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, vocab_size=128, max_position_embeddings=128, tie_word_embeddings=False)
OPTIM = {"lr": 5e-3, "min_lr": 1e-3, "lr_schedule": "cosine", "warmup_steps": 2, "weight_decay": 0.1,
         "adam_beta1": 0.9, "adam_beta2": 0.99, "adam_eps": 1e-8, "clip_grad": 0.5, "micro_batch_size": 1}
STEPS = 4  # one G,G,G,D period

# IS ratios the rollout wrapper sets, by (sample id % 4, response token j): on the bounds, outside, inside
_SET_RATIOS = {(0, 0): 0.5, (0, 1): 2.0, (1, 0): 0.25, (1, 1): 4.0, (2, 0): 0.7, (2, 1): 1.6}
_ON_BOUND = 1e-4
"""Relative distance to a bound under which the reference counts a ratio as on it (float noise)."""


# ------------------------------------------------------------------------------------------------
# models and configs
# ------------------------------------------------------------------------------------------------
def _hf_model(path: Path, seed: int, sharpen: float = 1.0) -> None:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**SHAPE)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.lm_head.weight.mul_(sharpen)  # teachers: distributions that differ clearly from the student's
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """HF student / general / domain (three seeds: the student differs from both teachers), converted."""
    d = tmp_path_factory.mktemp("oracle_models")
    for name, seed, sharpen in (("student", 1, 1.0), ("general", 2, 6.0), ("domain", 3, 3.0)):
        _hf_model(d / f"hf_{name}", seed, sharpen)
        convert_hf_to_megatron(d / f"hf_{name}", d / f"ours_{name}", progress=False)
    return d


def _cfg(models: Path, out: Path, preset: str, parallel: dict):
    from camopd_megatron.checkpoint.dist import read_manifest
    from camopd_megatron.config import load_config
    from camopd_megatron.config.api import config_from_dict, config_to_dict
    from camopd_megatron.config.loader import deep_merge

    base = config_to_dict(load_config(str(REPO / "examples/configs" / f"{preset}.yaml")))
    model = {k: v for k, v in read_manifest(models / "ours_student")["model_config"].items() if k != "checkpoint"}
    over = {
        "run": {"steps": STEPS, "output_dir": str(out), "seed": 11, "log_level": "WARNING"},
        "model": {**model, "checkpoint": str(models / "ours_student")},
        "teachers": [{"name": "general", "branches": ["general"], "checkpoint": str(models / "ours_general")},
                     {"name": "domain", "branches": ["domain"], "checkpoint": str(models / "ours_domain")}],
        "rollout": {"prompts_per_step": 8, "max_new_tokens": 8, "micro_batch_size": 8},
        "data": {"max_prompt_tokens": 16},
        "optim": OPTIM,
        "parallel": parallel,
        "checkpoint": {"save_interval": 0},  # the one checkpoint at the end of the run
        "logging": {"progress_bar": False},
        "eval": {"interval": 0},
    }
    return config_from_dict(deep_merge(base, over))


# ------------------------------------------------------------------------------------------------
# our side (launched ranks)
# ------------------------------------------------------------------------------------------------
def _exact_mu(logp: torch.Tensor, ratio: float) -> torch.Tensor | None:
    """A float32 μ with fl32(logp − μ) = fl32(log ratio), so exp() gives exactly ``ratio`` for 0.5 / 2.0
    (fl32(∓ln 2) is 1.9e-9 from ∓ln 2: exp is 0.03 ulp from the bound); None if no μ nearby does."""
    target = torch.tensor(math.log(ratio), dtype=torch.float32)
    mu = (logp.double() - math.log(ratio)).float()
    for _ in range(8):
        d = logp - mu
        if d == target:
            return mu
        mu = torch.nextafter(mu, torch.tensor(-math.inf if d < target else math.inf))
    return None


def _rollout_with_set_ratios(real, step_module, placed: list):
    """Wrap the step's rollout: μ of some response tokens is rewritten so that π/μ, π the pre-update
    student (the same forward, micro-batch 1, as the training forward), takes the values of
    ``_SET_RATIOS``. The record (``StepRecord.batch``) then holds the μ training used."""

    def rollout(student, prompts, sample_ids, settings, **kw):
        batch = real(student, prompts, sample_ids, settings, **kw)
        if len(batch) == 0:
            return batch
        logp = step_module.student_logprobs(student, batch, settings, settings.sampling.logprob_temperature)
        for b, sid in enumerate(batch.sample_ids):
            cols = batch.loss_mask_BT[b].nonzero().flatten().tolist()
            for j, col in enumerate(cols[:2]):
                ratio = _SET_RATIOS.get((sid % 4, j))
                if ratio is None:
                    continue
                mu = _exact_mu(logp[b, col], ratio) if ratio in (0.5, 2.0) else (logp[b, col].double() - math.log(ratio)).float()
                if mu is not None:
                    batch.rollout_logp_BT[b, col] = mu
                    placed.append((kw["step"], sid, col, ratio))
        return batch

    return rollout


def _train_and_record(rank: int, world_size: int, cfgs: list) -> list:
    """Train each config; per run: every step's rows (trimmed to their length), selection, metrics."""
    import camopd_megatron.distill.step as step_module
    from camopd_megatron.trainer import train

    step_module.rollout = _rollout_with_set_ratios(step_module.rollout, step_module, placed := [])
    runs = []
    for cfg in cfgs:
        steps: list = []
        placed.clear()

        def on_step(out) -> None:
            rec, rows = out.record, []
            for b, sid in enumerate(rec.sample_ids):
                n = int(rec.batch.prompt_lens_B[b] + rec.batch.response_lens_B[b])
                rows.append({"id": sid, "branch": rec.branches[b], "tokens": rec.batch.tokens_BT[b, :n].clone(),
                             "mask": rec.batch.loss_mask_BT[b, :n].bool(), "mu": rec.batch.rollout_logp_BT[b, :n].clone(),
                             "teacher": rec.teacher_logp_BT[b, :n].clone(), "keep": bool(rec.selection.keep_B[b]),
                             "r": float(rec.selection.adv_scale_B[b])})
            steps.append({"rows": rows, "n_kept": rec.selection.num_kept_global, "metrics": dict(out.metrics)})

        res = train(cfg, on_step=on_step)
        runs.append({"steps": steps, "ckpt": res.last_checkpoint, "placed": list(placed)})
    return runs


# ------------------------------------------------------------------------------------------------
# the reference (docs/algorithm.md; no code of ours)
# ------------------------------------------------------------------------------------------------
def _lr_at(k: int, o: dict, total: int) -> float:
    """optim.*: linear warmup to lr over warmup_steps (the k-th update at lr·(k+1)/warmup), then cosine to min_lr."""
    if k < o["warmup_steps"]:
        return o["lr"] * (k + 1) / o["warmup_steps"]
    progress = (k - o["warmup_steps"]) / max(total - o["warmup_steps"], 1)
    return o["min_lr"] + (o["lr"] - o["min_lr"]) * 0.5 * (1 + math.cos(math.pi * progress))


def _rho_keep(scores: dict[int, float], rho: float) -> set[int]:
    """§4: the shortest prefix (scores descending, ties lower id first) whose mass reaches ρ of the total
    (float64, relative slack 1e-9); zero mass or ρ = 1 keeps all."""
    total = sum(scores.values())
    if total <= 0 or rho >= 1:
        return set(scores)
    kept, mass = set(), 0.0
    for sid in sorted(scores, key=lambda i: (-scores[i], i)):
        kept.add(sid)
        mass += scores[sid]
        if mass >= rho * total - 1e-9 * total:
            return kept
    return kept


@functools.lru_cache(maxsize=None)
def _hf_float64(hf_dir: Path):
    """A HF model directory loaded once per test process, in float64 (copy it before training it)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
    return model.to(torch.float64).eval()


class Reference:
    """The student as a float64 ``transformers`` model, trained per docs/algorithm.md §2-§5 + AdamW."""

    def __init__(self, hf_dir: Path, cfg) -> None:
        self.model = copy.deepcopy(_hf_float64(hf_dir)).train()
        self.cfg, self.o = cfg, {k: float(v) if not isinstance(v, str) else v for k, v in OPTIM.items()}
        self.params = dict(self.model.named_parameters())
        # megatron's default rule (megatron/core/optimizer get_standard_config_overrides): no weight decay
        # for biases and every 1-D tensor (norms); here on the HF names of the same tensors
        self.no_decay = {n for n, p in self.params.items() if p.dim() == 1 or n.endswith(".bias")}
        self.m = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.v = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.k = 0

    def logprobs(self, row: dict) -> torch.Tensor:
        """log π(y_t | h_t) at the row's response positions (out[t] scores tokens[t+1]); 0 elsewhere."""
        logits = self.model(row["tokens"][None]).logits[0].double() / self.cfg.rollout.temperature
        lp = torch.log_softmax(logits, dim=-1)[:-1].gather(1, row["tokens"][1:, None])[:, 0]
        out = torch.cat([lp, lp.new_zeros(1)])
        return torch.where(row["mask"], out, torch.zeros_like(out))

    def select(self, rows: list[dict], gaps: dict[int, torch.Tensor]) -> tuple[set[int], dict[int, float], float]:
        """§4-§5: kept ids, r_i, and the step's lr factor (1 for scale_mode advantage)."""
        sel, adv_scale = self.cfg.selection, self.cfg.loss.adv_scale
        rule_keep: set[int] = set()
        for b in sorted({r["branch"] for r in rows}):
            scores = {}
            for r in (r for r in rows if r["branch"] == b):
                g, n = gaps[r["id"]][r["mask"]], int(r["mask"].sum())
                s = g.abs() if sel.score[b] == "abs" else g.clamp_min(0)
                scores[r["id"]] = float(s.sum()) / n if n else 0.0
            rule_keep |= _rho_keep(scores, float(sel.rho[b]))
        kept = rule_keep if sel.enabled else {r["id"] for r in rows}
        r_i = {r["id"]: (float(adv_scale[r["branch"]]) if (r["id"] in rule_keep or not sel.scale_only_selected) else 1.0)
               for r in rows}
        # NOTE selection.scale_mode: lr (added by another change of the same issue) moves r_b from the
        # advantage to the step's learning rate: there, return r_i = 1 for every sample and the step's
        # r_b as the lr factor (the step's branch; a mixed batch as that change defines it).
        return kept, r_i, 1.0

    def is_weight(self, ratio: torch.Tensor) -> torch.Tensor:
        """§3: w = ratio inside [is_low, is_high] (inclusive; ratios within float noise of a bound are on it)."""
        lo, hi = self.cfg.loss.is_low, self.cfg.loss.is_high
        inside = (ratio >= lo * (1 - _ON_BOUND)) & (ratio <= hi * (1 + _ON_BOUND))
        if self.cfg.loss.is_mode == "clamp":
            return ratio.clamp(lo, hi)
        return torch.where(inside, ratio, torch.zeros_like(ratio))

    def step(self, rows: list[dict]) -> dict:
        with torch.no_grad():  # §2: Δ from the pre-update student
            gaps = {r["id"]: torch.where(r["mask"], r["teacher"].double() - self.logprobs(r), 0.0) for r in rows}
        kept, r_i, lr_factor = self.select(rows, gaps)
        n_kept, clip = len(kept), self.cfg.loss.adv_clip
        loss = torch.zeros((), dtype=torch.float64)
        ratios = []
        for r in (r for r in rows if r["id"] in kept):
            lp, m = self.logprobs(r), r["mask"]
            adv = r_i[r["id"]] * gaps[r["id"]]
            if clip is not None:
                adv = adv.clamp(-clip, clip)
            ratio = torch.where(m, (lp.detach() - r["mu"].double()).exp(), 1.0)
            ratios.append(ratio[m])
            length = int(m.sum())
            if length:
                loss = loss - (self.is_weight(ratio) * adv * lp)[m].sum() / length
        loss = loss / max(n_kept, 1)
        self.model.zero_grad(set_to_none=False)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in self.params.items()}
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
        if self.o["clip_grad"] > 0 and norm > self.o["clip_grad"]:
            for g in grads.values():
                g.mul_(self.o["clip_grad"] / (norm + 1e-6))
        self.adamw(grads, _lr_at(self.k, self.o, STEPS) * lr_factor)
        return {"loss": float(loss.detach()), "kept": kept, "grad_norm": norm, "ratios": torch.cat(ratios) if ratios else None}

    @torch.no_grad()
    def adamw(self, grads: dict[str, torch.Tensor], lr: float) -> None:
        """Decoupled weight decay, then Adam with bias correction."""
        self.k += 1
        b1, b2, eps, wd = self.o["adam_beta1"], self.o["adam_beta2"], self.o["adam_eps"], self.o["weight_decay"]
        for n, p in self.params.items():
            g = grads[n]
            self.m[n].mul_(b1).add_(g, alpha=1 - b1)
            self.v[n].mul_(b2).addcmul_(g, g, value=1 - b2)
            if n not in self.no_decay:
                p.mul_(1 - lr * wd)
            m_hat, v_hat = self.m[n] / (1 - b1 ** self.k), self.v[n] / (1 - b2 ** self.k)
            p.sub_(lr * m_hat / (v_hat.sqrt() + eps))


def _teacher_logprobs(model, row: dict) -> torch.Tensor:
    with torch.no_grad():
        lp = torch.log_softmax(model(row["tokens"][None]).logits[0].double(), -1)[:-1].gather(1, row["tokens"][1:, None])[:, 0]
    return torch.where(row["mask"], torch.cat([lp, lp.new_zeros(1)]), 0.0)


def _expected_counts(cfg, step: int) -> dict[str, int]:
    """§6: the step's prompts per branch (alternating pattern; mixed: largest remainder)."""
    n, s = cfg.rollout.prompts_per_step, cfg.scheduler
    if s.mode == "alternating":
        return {s.pattern[step % len(s.pattern)]: n}
    shares = dict(s.mixed_shares)
    exact = {b: n * w / sum(shares.values()) for b, w in shares.items()}
    counts = {b: int(math.floor(x)) for b, x in exact.items()}
    order = sorted(shares, key=lambda b: (-(exact[b] - counts[b]), list(shares).index(b)))
    for b in order[: n - sum(counts.values())]:
        counts[b] += 1
    return counts


# ------------------------------------------------------------------------------------------------
# the test
# ------------------------------------------------------------------------------------------------
def _merge_rows(rank_runs: list[dict], step: int) -> list[dict]:
    """The step's rows over the DP replicas (a TP peer holds the same rows), by sample id."""
    rows: dict[int, dict] = {}
    for run in rank_runs:
        for r in run["steps"][step]["rows"]:
            if r["id"] in rows:
                assert torch.equal(rows[r["id"]]["tokens"], r["tokens"]) and torch.equal(rows[r["id"]]["mu"], r["mu"])
            rows[r["id"]] = r
    return [rows[i] for i in sorted(rows)]


def _check_run(models: Path, tmp: Path, cfg, rank_runs: list[dict], label: str) -> None:
    ref = Reference(models / "hf_student", cfg)
    teachers = {b: _hf_float64(models / f"hf_{b}") for b in ("general", "domain")}
    ours0 = rank_runs[0]
    set_ratios = {(s, sid, col): ratio for s, sid, col, ratio in (x for run in rank_runs for x in run["placed"])}
    on_bound = [x for x in set_ratios.values() if x in (0.5, 2.0)]
    assert on_bound.count(0.5) >= 2 and on_bound.count(2.0) >= 2, (label, set_ratios)
    for s in range(STEPS):
        rows = _merge_rows(rank_runs, s)
        m = ours0["steps"][s]["metrics"]
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["branch"]] = counts.get(r["branch"], 0) + 1
            # each sample scored by its own branch's teacher (routing, never averaging)
            assert (r["teacher"].double() - _teacher_logprobs(teachers[r["branch"]], r)).abs().max() < 1e-4, (label, s)
        assert counts == _expected_counts(cfg, s), (label, s, counts)
        out = ref.step(rows)
        kept = {r["id"] for r in rows if r["keep"]}
        assert kept == out["kept"], (label, s, sorted(kept), sorted(out["kept"]))
        assert ours0["steps"][s]["n_kept"] == len(kept)
        assert abs(m["train/loss"] - out["loss"]) <= 1e-5 * max(1.0, abs(out["loss"])), (label, s, m["train/loss"], out["loss"])
        assert abs(m["grad_norm"] - out["grad_norm"]) <= 1e-4 * out["grad_norm"], (label, s, m["grad_norm"], out["grad_norm"])
        # no ratio the wrapper did not set comes near a bound (where float noise could flip the mask)
        lo, hi = cfg.loss.is_low, cfg.loss.is_high
        near = [x for x in out["ratios"].tolist() if 1e-3 > min(abs(x / lo - 1), abs(x / hi - 1)) > _ON_BOUND]
        assert not near, (label, s, near)
        # our own mask counted the set outside ratios as outside, and nothing else (the on-bound ones are in)
        kept_set = [v for (st, sid, _), v in set_ratios.items() if st == s and sid in kept]
        assert round(m["train/is_low_rate"] * m["train/tokens"]) == kept_set.count(0.25), (label, s)
        assert round(m["train/is_high_rate"] * m["train/tokens"]) == kept_set.count(4.0), (label, s)
    # the parameters after the period, ours exported to HF: each tensor's update against the reference's
    hf_out = convert_megatron_to_hf(ours0["ckpt"], tmp / f"hf_after_{label.replace('/', '_')}", progress=False)
    after = dict(transformers.AutoModelForCausalLM.from_pretrained(hf_out).named_parameters())
    before = dict(_hf_float64(models / "hf_student").named_parameters())
    assert set(after) == set(ref.params)
    for name, p_ref in ref.params.items():
        d_ours = after[name].detach().double() - before[name].detach().double()
        d_ref = p_ref.detach() - before[name].detach().double()
        assert d_ref.norm() > 0, (label, name)
        err = float((d_ours - d_ref).norm() / d_ref.norm())
        assert err <= 1e-3, (label, name, err)


def _run_layout(checkpoints: Path, tmp: Path, parallel: dict, tag: str) -> None:
    cfgs = [_cfg(checkpoints, tmp / f"{tag}_{p}", p, parallel) for p in PRESETS]
    res = run_on_ranks(_train_and_record, 2, args=(cfgs,), timeout_s=900, pg_timeout_s=300)
    for i, preset in enumerate(PRESETS):
        _check_run(checkpoints, tmp, cfgs[i], [r[i] for r in res], f"{tag}/{preset}")


@pytest.mark.slow
def test_every_preset_matches_the_reference_at_dp2(checkpoints, tmp_path):
    _run_layout(checkpoints, tmp_path, {"tp": 1}, "dp2")


@pytest.mark.slow
def test_every_preset_matches_the_reference_at_tp2(checkpoints, tmp_path):
    _run_layout(checkpoints, tmp_path, {"tp": 2}, "tp2")
