"""Training modules by multi-grained module replacing with distillation (Theseus + KD).

Each step, per stack, a tiling is sampled: walking up the stack, at every position where
some module aligns, that module is swapped in with probability p (which rises linearly
over training), otherwise the original layer runs. Only module parameters train; the
teacher is frozen and also provides the targets: logits (KD at temperature T) and hidden
states at every span boundary (MSE, padding excluded).

`PlanAwareConfig` (the recipe plus a `PlanSampling`) draws each step's plans otherwise: from the
assembly strategies' ladders, from the whole assembly space, or several plans per step with their
losses summed (a sandwich); see `SAMPLERS`.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..surgery import span_block, stack_blocks, stack_depths, swapped
from ..tasks.base import Batch, Seq2SeqTask
from ..tasks.causal_lm import check_aligned
from ..distill import logit_kd
from ..keys import config_diff, weights_hash
from ..train import BOOKKEEPING, RunMismatchError, TrainConfig, on_main_process, train
from .bank import ModuleBank, block_params
from .plan import Plan, enumerate_plans, ladders, stack_ratio


@dataclass
class ReplacingConfig:
    granularities: tuple[int, ...] = (2, 3, 6)
    init: str = "last"               # teacher layer of its span a module starts from: "last" (its output
                                     # already looks like the span's) beat "first" by 4.7 WER at 2x (1000 steps)
    p_start: float = 0.1             # replacement probability at step 0 ...
    p_end: float = 1.0               # ... rising linearly to p_end at ramp * steps
    ramp: float = 0.8
    w_ce: float = 1.0                # task cross-entropy on the labels
    w_kd: float = 1.0                # logit distillation (KL at temperature T, times T^2)
    temperature: float = 2.0
    w_hidden: float = 1.0            # relative MSE to the teacher's hidden state at each span boundary
    w_local: float = 1.0             # modules fed the teacher's input to their span regress the teacher's
                                     # output of the span (relative MSE); each step, per stack, the modules
                                     # of ONE granularity drawn at random (a third of the cost of all)
    w_attn: float = 0.0              # KL of each block's self-attention maps to those of the teacher
                                     # layer its span ends at (needs eager attention: slower)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=3000, batch_size=64, lr=5e-4, warmup=200, precision="no", log_every=50, ckpt_every=250))
    # fp32: on CPU, bf16 autocast made a replacing step ~8x slower (1.6 s vs 0.2 s at batch 64)

    def granularities_for(self, depths: dict[str, int]) -> tuple[int, ...]:
        """`granularities`, checked against the teacher's stack depths; an impossible one (a module
        longer than the stack) raises an error that names it and a setting that fits."""
        for s, n in depths.items():
            bad = [k for k in self.granularities if not 2 <= k <= n]
            if bad:
                fit = tuple(sorted({k for k in self.granularities if 2 <= k <= n} | ({n} if n >= 2 else set())))
                fix = (f"ReplacingConfig(granularities={fit})" if fit else
                       "nothing: a 1-layer stack has no span to replace; compress another stack or use merging")
                raise ValueError(f"ReplacingConfig.granularities={tuple(self.granularities)}: {bad} impossible for the "
                                 f"{n}-layer stack {s!r} (a module replaces 2 to {n} layers); use {fix}")
        return tuple(self.granularities)

    def p_at(self, step: int) -> float:
        t = min(1.0, step / max(1, self.ramp * self.train.steps))
        return self.p_start + (self.p_end - self.p_start) * t

    def with_sampling(self, sampler: str, **kw) -> "PlanAwareConfig":
        """This recipe with plan-aware sampling (`PlanSampling(sampler, **kw)`): a `PlanAwareConfig`."""
        return PlanAwareConfig(**{f.name: getattr(self, f.name) for f in fields(ReplacingConfig)},
                               sampling=PlanSampling(sampler, **kw))


#: how each step's plans are drawn (`PlanSampling.sampler`):
SAMPLERS = {
    "granular": "the recipe: per stack, walking up, an aligned module with probability p (`sample_tilings`)",
    "ladder": "one plan drawn uniformly from the ladders of `strategies` (teacher excluded)",
    "space": "one plan drawn uniformly from the whole assembly space (teacher excluded)",
    "sandwich": "K = 3 plans, losses summed: the most compressed plan, a ladder rung, a granular draw",
    "mix": "K = 2 plans, losses summed: a granular draw and a ladder rung",
    "ladder_final": "granular draws, then the last `final_phase` of the steps on ladder rungs",
}


@dataclass(frozen=True)
class PlanSampling:
    """Which plans a module-replacing step trains (see `SAMPLERS`). Ladder plans are those the
    assembly strategies `strategies` produce for the teacher (`mtlab.modular.plan.ladders`),
    deduplicated, the teacher's own plan excluded."""

    sampler: str = "granular"
    strategies: tuple[str, ...] = ("size_first", "speed_first")
    final_phase: float = 0.2         # "ladder_final": the share of the steps (at the end) on ladder rungs

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"PlanSampling(sampler={self.sampler!r}) is unknown: use one of {sorted(SAMPLERS)}")
        if not 0 < self.final_phase <= 1:
            raise ValueError(f"PlanSampling(final_phase={self.final_phase}) must be in (0, 1]: the share of the "
                             "steps at the end that train ladder rungs, e.g. 0.2")
        if not self.strategies:
            raise ValueError("PlanSampling(strategies=()) names no assembly strategy: use e.g. "
                             "('size_first', 'speed_first')")
        object.__setattr__(self, "strategies", tuple(self.strategies))


@dataclass
class PlanAwareConfig(ReplacingConfig):
    """`ReplacingConfig` plus how each step's plans are drawn. A subclass, not a new field of
    ReplacingConfig, so the shipped recipe's `asdict` (its card and every cache key) is unchanged."""

    sampling: PlanSampling = field(default_factory=PlanSampling)


def sampling_of(cfg: ReplacingConfig) -> PlanSampling:
    """The plan sampling of a recipe (the granular sampler for a plain ReplacingConfig)."""
    return getattr(cfg, "sampling", None) or PlanSampling()


def sample_tiling(depth: int, ks: tuple[int, ...], p: float, rng: random.Random) -> tuple[int, ...]:
    """Walk up a stack; where modules align, take one (uniformly among them) with probability p."""
    pos, out = 0, []
    while pos < depth:
        fits = [k for k in ks if pos % k == 0 and pos + k <= depth]
        if fits and rng.random() < p:
            k = rng.choice(fits)
        else:
            k = 1
        out.append(k)
        pos += k
    return tuple(out)


def sample_tilings(depths: dict[str, int], granularities: dict[str, tuple[int, ...]], p: float,
                   rng: random.Random) -> dict[str, tuple[int, ...]]:
    """One tiling per stack; if no module was drawn anywhere, one aligned module chosen
    uniformly is swapped in, so every step trains something (at low p most draws are empty)."""
    out = {s: sample_tiling(n, granularities.get(s, ()), p, rng) for s, n in depths.items()}
    if any(k > 1 for t in out.values() for k in t):
        return out
    choices = [(s, k, j) for s, n in depths.items() for k in granularities.get(s, ()) for j in range(n // k)]
    if choices:
        s, k, j = rng.choice(choices)
        n = depths[s]
        out[s] = (1,) * (j * k) + (k,) + (1,) * (n - (j + 1) * k)
    return out


class PlanPool:
    """The plans the plan-aware samplers draw from, for one teacher's stack depths, the bank's
    granularities and the teacher's block sizes: the ladders of `strategies` and the whole
    assembly space (each without the teacher's own plan), and the most compressed plan."""

    def __init__(self, depths: dict[str, int], granularities: dict[str, tuple[int, ...]],
                 block_params: dict[str, int], strategies=("size_first", "speed_first")):
        self.depths, self.granularities = dict(depths), {s: tuple(granularities.get(s, ())) for s in depths}
        self.block_params, self.strategies = dict(block_params), tuple(strategies)

    @property
    def teacher(self):
        return Plan.teacher(self.depths)

    @cached_property
    def ladder(self) -> list[dict[str, tuple[int, ...]]]:
        out = []
        for _, plan in ladders(self.depths, self.granularities, self.block_params, names=self.strategies):
            spans = dict(plan.spans)
            if plan != self.teacher and spans not in out:
                out.append(spans)
        if not out:
            raise ValueError(f"the strategies {self.strategies} give no plan besides the teacher for this bank "
                             f"(granularities {self.granularities}): train modules first, or use sampler='granular'")
        return out

    @cached_property
    def space(self) -> list[dict[str, tuple[int, ...]]]:
        out = [dict(p.spans) for p in enumerate_plans(self.depths, self.granularities) if p != self.teacher]
        if not out:
            raise ValueError(f"the assembly space of granularities {self.granularities} holds only the teacher: "
                             "train modules first, or use sampler='granular'")
        return out

    @cached_property
    def most_compressed(self) -> dict[str, tuple[int, ...]]:
        """The plan of the fewest parameters (the first of the space at the highest ratio)."""
        return max(self.space, key=lambda spans: stack_ratio(spans, self.block_params))


def sample_plans(sampling: PlanSampling, pool: PlanPool, step: int, steps: int, p: float,
                 rng: random.Random) -> list[dict[str, tuple[int, ...]]]:
    """The plans (one tiling per stack each) step `step` of `steps` trains under `sampling` (see
    `SAMPLERS`); granular draws use `sample_tilings` at probability p. Deterministic given rng."""
    def granular():
        return sample_tilings(pool.depths, pool.granularities, p, rng)

    def rung():
        return dict(rng.choice(pool.ladder))

    s = sampling.sampler
    if s == "granular":
        return [granular()]
    if s == "ladder":
        return [rung()]
    if s == "space":
        return [dict(rng.choice(pool.space))]
    if s == "sandwich":
        return [dict(pool.most_compressed), rung(), granular()]
    if s == "mix":
        return [granular(), rung()]
    if s == "ladder_final":
        return [rung()] if step >= (1 - sampling.final_phase) * steps else [granular()]
    raise ValueError(f"unknown sampler {s!r}: use one of {sorted(SAMPLERS)}")


class Replacer(nn.Module):
    """The frozen teacher plus the bank: what the training loop sees as `model`."""

    def __init__(self, teacher: nn.Module, bank: ModuleBank):
        super().__init__()
        self.teacher = teacher
        self.bank = bank
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.originals = stack_blocks(teacher)
        self.seq2seq = bool(getattr(teacher.config, "is_encoder_decoder", False))

    def check_causal_batch(self, batch: Batch) -> None:
        """A decoder-only teacher needs labels aligned with its logits (labels[t] = input_ids[t + 1], as
        CausalLMTask makes them): labels equal to the inputs (Hugging Face's convention, where the model
        shifts) would train every position to copy its own token."""
        keep = batch.labels != -100
        if batch.labels.shape == batch.input_ids.shape and keep.any() and \
                torch.equal(batch.labels[keep], batch.input_ids[keep]):
            raise ValueError("the labels equal the input ids: mtlab's labels are aligned with the logits "
                             "(labels[t] is the token after input_ids[t]); shift them by one, or use "
                             "mtlab.tasks.CausalLMTask, which does")

    def blocks_for(self, stack: str, tiling: tuple[int, ...]) -> tuple[list[nn.Module], list[int]]:
        """Blocks of a tiling and the teacher layer index each block's output corresponds to."""
        blocks, ends, pos = [], [], 0
        for k in tiling:
            blocks.append(span_block(self.originals, self.bank, stack, pos, k))
            pos += k
            ends.append(pos - 1)
        return blocks, ends


def global_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over the processes of a distributed run (t itself in one process); no gradient."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.detach().clone()
        dist.all_reduce(t)
    return t


def relative_mse(student: torch.Tensor, target: torch.Tensor, share: float = 1.0) -> torch.Tensor:
    """||student - target||^2 / ||target||^2 over the GLOBAL batch: scale-free, so T5's residual
    stream (whose norm grows with depth to hundreds) weighs no more than the logit losses.

    Under N processes each holds a shard: its numerator is divided by the denominator summed over
    all processes and by `share`, its share of the batch's target tokens (mtlab.train weights each
    process's loss by that share), so the averaged gradient is the one-process gradient. The
    target (the teacher's) carries no gradient. In one process: the plain ratio."""
    den = global_sum(target.pow(2).sum().detach())
    return (student - target).pow(2).sum() / den.clamp_min(1e-12) / share


def token_share(batch: Batch) -> float:
    """This process's share of the global batch's target tokens (1.0 in one process)."""
    mine = (batch.labels != -100).sum().double()
    return (mine / global_sum(mine)).item()


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def capture_outputs(blocks: list[nn.Module], store: list) -> list:
    """Forward hooks writing each block's output hidden state into store[n] (remove them after)."""
    return [b.register_forward_hook(lambda m, i, o, n=n: store.__setitem__(n, _out(o))) for n, b in enumerate(blocks)]


_capture = capture_outputs


def student_pass(model: "Replacer", inputs: dict, p: float, rng: random.Random,
                 tilings: dict[str, tuple[int, ...]] | None = None):
    """One sampled mix: a tiling per stack (`tilings`, or drawn by `sample_tilings` at probability p),
    the model run with those blocks swapped in (the originals always come back), and each block's
    output hidden state. Returns (output, tilings, {stack: (blocks, teacher layer each block ends at)},
    {stack: outputs})."""
    stacks = list(model.originals)
    if tilings is None:
        tilings = sample_tilings({s: len(model.originals[s]) for s in stacks}, model.bank.granularities, p, rng)
    plan_blocks = {s: model.blocks_for(s, t) for s, t in tilings.items()}
    s_hidden = {s: [None] * len(plan_blocks[s][0]) for s in stacks}
    hooks = []
    try:
        with swapped(model.teacher, {s: plan_blocks[s][0] for s in stacks}):
            for s in stacks:
                hooks += capture_outputs(plan_blocks[s][0], s_hidden[s])
            model.bank.train()
            out = model.teacher(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return out, tilings, plan_blocks, s_hidden


def teacher_pass(model: "Replacer", inputs: dict, *, local: bool):
    """The frozen teacher once: its output, every layer's output hidden state per stack, and (for the
    local loss) the exact call each aligned span's first layer received, keyed (stack, start)."""
    model.teacher.eval()
    t_hidden = {s: [None] * len(b) for s, b in model.originals.items()}
    hooks = [h for s, b in model.originals.items() for h in capture_outputs(b, t_hidden[s])]
    span_inputs: dict[tuple[str, int], tuple] = {}
    if local:
        starts = {(s, j * k) for s in model.originals for k in model.bank.granularities.get(s, ())
                  for j in range(len(model.originals[s]) // k)}
        hooks += [model.originals[s][i].register_forward_pre_hook(
            lambda m, a, kw, key=(s, i): span_inputs.__setitem__(key, (a, kw)), with_kwargs=True)
            for s, i in starts]
    try:
        with torch.no_grad():
            out = model.teacher(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return out, t_hidden, span_inputs


ATTENTIONS = {"encoder": "encoder_attentions", "decoder": "decoder_attentions", "layers": "attentions"}


def attention_kd(s_out, t_out, ends: dict[str, list[int]], masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of KL(teacher layer at the span's end || block) between self-attention
    maps, summed over keys and averaged over heads and real (unpadded) query positions."""
    total, n = None, 0
    for s, block_ends in ends.items():
        t_att, s_att = getattr(t_out, ATTENTIONS[s]), getattr(s_out, ATTENTIONS[s])
        if not t_att or not s_att:
            raise ValueError("attention distillation (w_attn > 0) needs attention maps: use eager attention "
                             "(train_modules switches the teacher to it) or set w_attn=0")
        for i, end in enumerate(block_ends):
            t, q = t_att[end].float(), s_att[i].float()
            kl = (t * (t.clamp_min(1e-9).log() - q.clamp_min(1e-9).log())).sum(-1).mean(1)  # (batch, queries)
            term = kl[masks[s]].mean()
            total, n = (term if total is None else total + term), n + 1
    return total / max(1, n)


def stack_masks(batch: Batch, stacks) -> dict[str, torch.Tensor]:
    """The positions each stack's hidden states are compared on: a seq2seq decoder runs on the
    label positions, an encoder or a single stack ("layers") on the real (unpadded) input tokens."""
    return {s: (batch.labels != -100) if s == "decoder" else batch.attention_mask.bool() for s in stacks}


def local_loss(model: "Replacer", span_inputs: dict, t_hidden: dict, masks: dict,
               granularities: dict | None = None, share: float = 1.0) -> torch.Tensor:
    """Mean relative MSE of each module (of `granularities` per stack; default all) run on the
    teacher's input to its span (the exact call the span's first teacher layer received)
    against the teacher's output of the span."""
    total, n = None, 0
    for (s, start), (args, kwargs) in span_inputs.items():
        for k in (granularities or model.bank.granularities).get(s, ()):
            if start % k or start + k > len(model.originals[s]):
                continue
            out = _out(model.bank.get(s, k, start // k)(*args, **kwargs))
            m = masks[s]
            term = relative_mse(out.float()[m], t_hidden[s][start + k - 1].float()[m], share)
            total, n = (term if total is None else total + term), n + 1
    return total / max(1, n)


def replacing_loss(cfg: ReplacingConfig, seed: int = 0):
    """loss_fn for mtlab.train: teacher pass (targets), sampled mixed pass(es), weighted loss.

    The plans of a step follow `sampling_of(cfg)` (one granular draw for the shipped recipe); with
    several plans per step (sandwich, mix) their task, KD and hidden-state losses are SUMMED, the
    local loss (which does not depend on the plan) counts once, and the logged parts are means."""
    rng_by_step = lambda step: random.Random(seed * 1_000_003 + step)  # noqa: E731 - resumable sampling
    sampling = sampling_of(cfg)
    pools: dict[int, PlanPool] = {}

    def pool_of(model: Replacer) -> PlanPool:
        if id(model) not in pools:
            pools[id(model)] = PlanPool({s: len(b) for s, b in model.originals.items()}, model.bank.granularities,
                                        block_params(model.teacher), sampling.strategies)
        return pools[id(model)]

    def loss_fn(model: Replacer, batch: Batch, step: int):
        rng = rng_by_step(step)
        share = token_share(batch)  # relative MSEs are ratios over the global batch (see relative_mse)
        stacks = list(model.originals)
        masks = stack_masks(batch, stacks)
        inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                      output_attentions=cfg.w_attn > 0)
        if model.seq2seq:  # the decoder reads the labels shifted right; a decoder-only model needs no labels
            inputs["labels"] = batch.labels
        else:
            model.check_causal_batch(batch)
        t_out, t_hidden, span_inputs = teacher_pass(model, inputs, local=cfg.w_local > 0)
        p = cfg.p_at(step)
        plans = [None] if sampling.sampler == "granular" else \
            sample_plans(sampling, pool_of(model), step, cfg.train.steps, p, rng)
        loss, attn, sums, modules_in = None, None, {}, 0
        labels = batch.labels
        keep = labels != -100
        for tilings in plans:  # None: student_pass draws the recipe's granular tiling itself
            s_out, tilings, plan_blocks, s_hidden = student_pass(model, inputs, p, rng, tilings=tilings)
            s_logits = s_out.logits
            check_aligned(s_logits, labels)
            ce = F.cross_entropy(s_logits.float()[keep], labels[keep])
            kd = logit_kd(s_logits, t_out.logits, keep, cfg.temperature)
            mse, n = s_logits.new_zeros(()).float(), 0
            for s in stacks:
                m = masks[s]
                for out, end in zip(s_hidden[s], plan_blocks[s][1]):
                    mse = mse + relative_mse(out.float()[m], t_hidden[s][end].float()[m], share)
                    n += 1
            mse = mse / max(1, n)
            term = cfg.w_ce * ce + cfg.w_kd * kd + cfg.w_hidden * mse
            loss = term if loss is None else loss + term
            for k, v in (("ce", ce), ("kd", kd), ("hidden_mse", mse)):
                sums[k] = sums.get(k, 0.0) + v.item()
            if cfg.w_attn > 0:
                a = attention_kd(s_out, t_out, {s: plan_blocks[s][1] for s in stacks}, masks)
                attn = a if attn is None else attn + a
            modules_in += sum(k > 1 for t in tilings.values() for k in t)
        parts = {k: v / len(plans) for k, v in sums.items()}
        if cfg.w_local > 0:
            ks = {s: (rng.choice(model.bank.granularities[s]),) for s in stacks if model.bank.granularities.get(s)}
            local = local_loss(model, span_inputs, t_hidden, masks, ks, share)
            loss = loss + cfg.w_local * local
            parts["local_mse"] = local.item()
        if cfg.w_attn > 0:
            loss = loss + cfg.w_attn * attn
            parts["attn_kl"] = attn.item() / len(plans)
        extra = {} if sampling.sampler == "granular" else {"plans": len(plans)}
        return loss, {**parts, "p": p, "modules_in": modules_in, **extra}

    return loss_fn


def train_modules(teacher: nn.Module, task: Seq2SeqTask, cfg: ReplacingConfig, out_dir: str | Path,
                  *, max_seconds: float | None = None, progress: bool = True,
                  evaluate=None, fresh: bool = False) -> tuple[ModuleBank, pd.DataFrame]:
    """Build the bank from the teacher and train every module in ONE run; saves the bank to out_dir/bank.

    Resumable (out_dir/checkpoint). An out_dir holding a run (checkpoint or bank) made with another
    config raises RunMismatchError listing the differing fields; `fresh=True` deletes that run first.
    `evaluate(replacer)` (optional) adds dev scores to the log every `cfg.train.eval_every` steps.
    Returns (bank, per-step log DataFrame with the config in attrs)."""
    import json
    import shutil

    out = Path(out_dir)
    saved = out / "bank" / "bank.json"
    teacher_hash = weights_hash(teacher)
    if fresh:
        on_main_process(lambda: shutil.rmtree(out / "bank", ignore_errors=True))
    had_bank = saved.exists()  # read once, before training: every process takes the same branch below
    if had_bank:
        old = json.loads(saved.read_text())
        diffs = config_diff(old.get("config"), asdict(cfg), prefix="replacing.",
                            ignore=tuple(f"train.{k}" for k in BOOKKEEPING))
        diffs += config_diff({"teacher_hash": old.get("teacher_hash", teacher_hash)}, {"teacher_hash": teacher_hash})
        if diffs:
            raise RunMismatchError(f"{out / 'bank'} holds modules trained with another config or teacher:\n  " + "\n  ".join(diffs)
                                   + "\nUse a fresh out_dir, rerun with that config, or pass fresh=True to delete the old run")
    if cfg.w_attn > 0 and getattr(teacher.config, "_attn_implementation", "eager") != "eager":
        teacher.set_attn_implementation("eager")  # attention maps are only returned by eager attention
    if cfg.w_attn > 0:
        # transformers installs its output-capturing hooks on the blocks present at the first forward;
        # run one before the bank copies the blocks, so modules report attention maps too
        with torch.no_grad():
            teacher(**task.collate(cfg.train.split, [0]).model_inputs(), output_attentions=True)
    bank = ModuleBank.build(teacher, cfg.granularities_for(stack_depths(teacher)), cfg.init)
    bank.teacher_hash = teacher_hash  # recorded by bank.save: the bank loads for this teacher only
    model = Replacer(teacher, bank)
    meta = {"replacing": {k: v for k, v in asdict(cfg).items() if k != "train"},  # train: compared by train()
            "teacher_hash": bank.teacher_hash}
    log = train(model, task, cfg.train, out, params=list(bank.parameters()),
                loss_fn=replacing_loss(cfg, cfg.train.seed), max_seconds=max_seconds, progress=progress,
                evaluate=evaluate, fresh=fresh, meta=meta)
    if len(log) and int(log.step.max()) >= cfg.train.steps and not had_bank:  # never rewrite a saved bank
        on_main_process(lambda: bank.save(out / "bank", {"config": asdict(cfg)}))
    log.attrs["config"] = asdict(cfg)
    return bank, log
