"""ONE training loop for everything mtlab trains: the teacher, modules, recovery fine-tunes.

Built on accelerate, so the same code runs in one CPU process or under
`accelerate launch` on several GPUs. Deterministic data order from
(seed, epoch), resumable from an atomic safetensors checkpoint, a progress bar,
and a CSV log of losses and periodic evaluations. A checkpoint records its config and what the
run is of (`run_identity`: the weights hash of the model it started from and the hash of the data it
trains on): resuming it with another config, model or data is refused with RunMismatchError naming
the field (runs never mix), and a run that fails before its first checkpoint leaves no folder behind.

Under N processes every process builds the same global batches (N * batch_size
examples) and takes every N-th example of each; its loss is weighted by its share
of the global batch's target tokens and the gradients are averaged, so the update
is the one-process update on the global batch, exactly for token-mean losses.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .runtime import adaptive
from .checkpoint import CheckpointError, atomic_dir, latest_dir, load_tensors, load_training_state, save_training_state
from .keys import config_diff, config_hash, weights_hash
from .paths import shown
from .tasks.base import Batch, Seq2SeqTask


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN/inf; the last good checkpoint is left untouched."""


class RunMismatchError(CheckpointError):
    """out_dir holds a run (a checkpoint, a bank, a recipe's output) made with another config, model
    or data: resuming it would mix two runs, or return the other run's weights. The message names
    the differing fields and how to proceed."""


def data_hash(task, *splits: str) -> str:
    """Content hash of the token ids a run reads from `splits` (default "train") of `task`: another
    data file, split or tokenizer gives another hash. `mtlab.cache.config_hash` of the encoded
    examples, remembered on the task while its encoding is unchanged."""

    memo = getattr(task, "_mtlab_data_hashes", None)
    if memo is None:
        memo = {}
        try:
            task._mtlab_data_hashes = memo
        except AttributeError:  # a task that takes no attributes: hash every time
            pass
    per_split = {}
    for split in splits or ("train",):
        encoded = task.encoded(split)
        seen = memo.get(split)
        if seen is None or seen[0] is not encoded:
            seen = memo[split] = (encoded, config_hash(encoded))
        per_split[split] = seen[1]
    return config_hash(per_split)


def run_identity(model: torch.nn.Module, task, split: str = "train") -> dict[str, str]:
    """What a run is of: {"model_hash": weights hash of `model` as given (`mtlab.keys.weights_hash`,
    the one used for teachers and banks), "data_hash": `data_hash(task, split)`}. `train` records it in
    every checkpoint and refuses to resume one of another model or data."""
    return {"model_hash": weights_hash(model), "data_hash": data_hash(task, split)}


#: TrainConfig fields that change no weight (only logging and checkpoint cadence): may differ on resume
BOOKKEEPING = ("log_every", "ckpt_every", "eval_every")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 128          # per process; global batch = batch_size * processes
    lr: float = 1e-3
    warmup: int = 500
    min_lr_ratio: float = 0.05     # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    label_smoothing: float = 0.0
    grad_clip: float = 1.0
    precision: str = "no"          # "no" (fp32) or "bf16" autocast
    seed: int = 0
    split: str = "train"
    log_every: int = 50
    ckpt_every: int = 500
    eval_every: int = 0            # 0: only at the end
    extra: dict = field(default_factory=dict)  # free-form, recorded with results

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


LossFn = Callable[[torch.nn.Module, Batch, int], "tuple[torch.Tensor, dict[str, float]]"]
EvalFn = Callable[[torch.nn.Module], "dict[str, float]"]


def cross_entropy_loss(label_smoothing: float = 0.0) -> LossFn:
    """Token cross-entropy of a seq2seq model (padding ignored), optionally label-smoothed."""

    def loss_fn(model, batch: Batch, step: int):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=-100,
                               label_smoothing=label_smoothing)
        return loss, {"ce": loss.item()}

    return loss_fn


def train(
    model: torch.nn.Module,
    task: Seq2SeqTask,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    params: list[torch.nn.Parameter] | None = None,
    loss_fn: LossFn | None = None,
    evaluate: EvalFn | None = None,
    max_seconds: float | None = None,
    progress: bool = True,
    fresh: bool = False,
    meta: dict | None = None,
) -> pd.DataFrame:
    """Train `params` (default: every parameter that requires grad) for cfg.steps steps.

    Resumes from `out_dir/checkpoint` when present, if that checkpoint was written with the same
    config (and the same `meta`, a JSON-able description of what the caller trains, stored with
    it), from the same model weights and the same data (`run_identity`: a checkpoint of another
    model of the same shape would otherwise hand back that model's weights); otherwise raises
    RunMismatchError listing the differing fields. `fresh=True` deletes the old checkpoint and log
    first. A folder whose earlier run stopped before its first checkpoint restarts from step 0,
    and says so. `loss_fn(model, batch, step)` returns (loss, parts), a mean over
    the batch's target tokens (see the module docstring), and defaults to token cross-entropy.
    Returns the log as a DataFrame. `max_seconds` stops early (after a checkpoint) so long runs
    can be split across sessions. A run that fails before its first checkpoint removes the
    out_dir it created (or the log it started in an existing one).
    """
    from accelerate import Accelerator

    out = Path(out_dir)
    created = _first_missing(out)  # the folder this call creates (out or an ancestor), if any
    accel = Accelerator(mixed_precision=cfg.precision, cpu=not torch.cuda.is_available())
    main = accel.is_main_process
    if fresh and main:
        remove_run(out)
    accel.wait_for_everyone()
    had_log = (out / "log.csv").exists()
    identity = run_identity(model, task, cfg.split)
    if accel.num_processes > 1:  # one identity for every process: the main process's model is the one trained
        from accelerate.utils import broadcast_object_list

        identity = broadcast_object_list([identity], from_process=0)[0]
    check_resume(out, cfg, meta, identity)
    try:
        return _train(model, task, cfg, out, accel, params=params, loss_fn=loss_fn, evaluate=evaluate,
                      max_seconds=max_seconds, progress=progress, meta=meta, identity=identity)
    except BaseException:
        if main and latest_dir(out / "checkpoint") is None:  # nothing to resume: leave nothing behind
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            elif not had_log:
                (out / "log.csv").unlink(missing_ok=True)
        raise


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (None if path exists)."""
    if path.exists():
        return None
    path = path.absolute()
    while not path.parent.exists():
        path = path.parent
    return path


def remove_run(out_dir: str | Path) -> None:
    """Delete what `train` writes in out_dir (checkpoint and its temporary versions, log)."""
    out = Path(out_dir)
    for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("log.csv", "log.csv.tmp"):
        (out / name).unlink(missing_ok=True)


def _json(obj):
    return json.loads(json.dumps(obj))


def check_resume(out_dir: str | Path, cfg: TrainConfig, meta: dict | None = None,
                 identity: dict | None = None) -> None:
    """Raise RunMismatchError if out_dir's checkpoint was made with another config or meta (fields
    in BOOKKEEPING may differ) or, given `identity` (`run_identity` of the model and task about to
    train), from another model or data: each differing field is named ("model_hash: checkpoint
    'a1...', now 'b2...'"). The model a run left in memory (its weights equal the checkpoint's) may
    resume it. A corrupt checkpoint is reported as such first."""
    found = latest_dir(Path(out_dir) / "checkpoint")
    if found is None:
        return
    try:
        state = json.loads((found / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{found}/state.json is unreadable ({e}); delete {found} to restart training") from e
    new = _json({"train": asdict(cfg), "meta": meta})
    legacy = "identity" not in state  # written before runs recorded their model and data
    diffs = []
    for part, key in (("train", "config"), ("meta", "meta")):
        if key in state and not (legacy and part == "meta" and state[key] is None):  # older: nothing to compare
            diffs += config_diff(state[key], new[part], ignore=BOOKKEEPING if part == "train" else (), prefix=f"{part}.")
    if identity is not None and not legacy:
        old = dict(state["identity"])
        if state.get("weights_hash") == identity.get("model_hash"):  # the model this run trained, continued
            old["model_hash"] = identity["model_hash"]
        diffs = config_diff(old, identity) + diffs
    elif identity is not None:
        print(f"note: {shown(found)} records no model or data hash (an older mtlab wrote it): it is resumed "
              "without checking that it was made from this model and data", flush=True)
    if diffs:
        for name in ("weights.safetensors", "optimizer.safetensors"):
            load_tensors(found / name)  # a corrupt checkpoint says so, whatever its config
        other = [k for k in ("model_hash", "data_hash") if any(d.startswith(k + ":") for d in diffs)]
        what = " and ".join({"model_hash": "another model (other weights)", "data_hash": "other data"}[k]
                            for k in other) or "another config"
        raise RunMismatchError(
            f"{out_dir} holds a checkpoint (step {state.get('step')}) of a run of {what}; resuming it would "
            "mix two runs (a finished one would return its own weights, not this model's). Differences:\n  "
            + "\n  ".join(diffs) + "\nUse a fresh out_dir, delete this one, "
            + ("" if other else "rerun with the checkpoint's config, ") + "or pass fresh=True to delete the old run")


def _train(model, task, cfg: TrainConfig, out: Path, accel, *, params, loss_fn, evaluate, max_seconds, progress,
           meta, identity) -> pd.DataFrame:
    """The loop itself (see train)."""
    from accelerate.utils import set_seed

    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    log_path = out / "log.csv"
    set_seed(cfg.seed)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    loss_fn = loss_fn or cross_entropy_loss(cfg.label_smoothing)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


    start, logged = 0, _logged_step(log_path)
    if (found := latest_dir(ckpt)) is not None:
        start = load_training_state(found, model, params, optimizer)["step"]
        redo = (f"; the earlier run had logged step {logged}, steps {start + 1}-{logged} are redone"
                if logged > start else "")
        accel.print(f"resuming from {shown(found)} at step {start}/{cfg.steps}{redo}")
    elif logged:  # killed before its first checkpoint: nothing to resume (mtlab.recipe checkpoints sooner)
        accel.print(f"no checkpoint in {shown(out)}: the earlier run stopped at step {logged}/{cfg.steps} before its "
                    f"first checkpoint (one every {cfg.ckpt_every} steps), so training restarts from step 0")
    if accel.is_main_process:
        _truncate_log(log_path, start)
    # the model is not wrapped in DDP: loss_fns call submodules (a Replacer's teacher and bank, a
    # distillation teacher) rather than the model's forward, and leave parameters unused in a step
    model.to(accel.device)
    optimizer = accel.prepare(optimizer)
    world, rank = accel.num_processes, accel.process_index
    if world > 1:
        _broadcast_from_main(model)
    model.train()

    shards = _Shards(task, cfg, world, rank, accel.device)
    t0, elapsed0 = time.perf_counter(), _logged_seconds(log_path)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", disable=not progress or not accel.is_main_process)
    step = start
    running: dict[str, float] = {}
    counted = 0
    for step in adaptive(bar):
        lr = cfg.lr_at(step)
        batch, weight = shards.batch(step)
        parts = _update(model, batch, weight, step, lr, accel, optimizer, params, loss_fn, cfg, world)
        if not math.isfinite(parts["loss"]):  # the global batch's loss: every process stops here
            raise NonFiniteLossError(
                f"loss is {parts['loss']} at step {step}; training stopped. The last good checkpoint "
                f"({ckpt if ckpt.exists() else 'none yet'}) is intact. Lower the learning rate "
                f"(now {lr:.2e}), use precision='no', or check the data.")
        for k, v in parts.items():
            running[k] = running.get(k, 0.0) + v
        counted += 1
        done = step + 1
        row = None
        if done % cfg.log_every == 0 or done == cfg.steps:
            # mean over the steps since the last row (fewer right after a resume)
            row = {"step": done, "lr": lr, **{k: v / counted for k, v in running.items()}}
            running, counted = {}, 0
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.1e}")
        if evaluate is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
            row = row or {"step": done, "lr": lr}
            if accel.is_main_process:
                row.update({f"dev_{k}": v for k, v in evaluate(model).items() if isinstance(v, (int, float))})
            model.train()
        out_of_time = max_seconds is not None and time.perf_counter() - t0 > max_seconds
        if max_seconds is not None and world > 1:  # every process stops at the same step
            flag = torch.tensor([float(out_of_time)], device=accel.device)
            torch.distributed.all_reduce(flag)
            out_of_time = bool(flag.item())
        if row is not None and accel.is_main_process:
            row["seconds"] = elapsed0 + time.perf_counter() - t0
            _append_log(log_path, row)
        if done % cfg.ckpt_every == 0 or done == cfg.steps or out_of_time:
            accel.wait_for_everyone()
            if accel.is_main_process:
                with atomic_dir(ckpt) as tmp:
                    save_training_state(tmp, model, params, optimizer, done,
                                        {"config": asdict(cfg), "meta": _json(meta), "identity": identity,
                                         "weights_hash": weights_hash(model)})
        if out_of_time:
            accel.print(f"stopping at step {done} after {max_seconds:.0f}s; rerun the same command to resume")
            break
    bar.close()
    accel.wait_for_everyone()
    return read_log(log_path)


class _Shards:
    """Deterministic data order: one global batch (batch_size x N processes) per step, shuffled by
    (seed, epoch); each process takes every N-th example of it. A (rare) last batch with fewer
    examples than processes is skipped."""

    def __init__(self, task, cfg: TrainConfig, world: int, rank: int, device):
        self.task, self.cfg, self.world, self.rank, self.device = task, cfg, world, rank, device
        self.per_epoch = len(self._global())
        if self.per_epoch == 0:
            raise ValueError(f"split {cfg.split!r} has fewer than {world} examples")
        self.targets = task.encoded(cfg.split)[1]
        self._epoch: tuple[int, list[list[int]]] | None = None

    def _global(self, **kw) -> list[list[int]]:
        return [b for b in self.task.batches(self.cfg.split, self.cfg.batch_size * self.world, **kw)
                if len(b) >= self.world]

    def batch(self, step: int) -> tuple[Batch, float]:
        """This process's share of the step's global batch, and the weight of its loss: its share
        of the global batch's target tokens, times N (1 in one process)."""
        epoch, i = divmod(step, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self._global(shuffle=True, seed=self.cfg.seed, epoch=epoch))
        full = self._epoch[1][i]
        mine = full[self.rank::self.world]
        weight = 1.0
        if self.world > 1:
            weight = self.world * sum(len(self.targets[j]) for j in mine) / sum(len(self.targets[j]) for j in full)
        return self.task.collate(self.cfg.split, mine).to(self.device), weight


def _update(model, batch: Batch, weight: float, step: int, lr: float, accel, optimizer, params, loss_fn,
            cfg: TrainConfig, world: int) -> dict[str, float]:
    """One optimizer step at learning rate `lr`; returns the step's loss parts (averaged over
    processes). A non-finite loss is returned, not applied to the weights."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    with accel.autocast():
        loss, parts = loss_fn(model, batch, step)
    accel.backward(loss * weight if world > 1 else loss)
    parts = {"loss": loss.item(), **parts}
    if world > 1:
        parts = _average_gradients(params, parts, weight)
    if not math.isfinite(parts["loss"]):
        optimizer.zero_grad(set_to_none=True)
        return parts
    if cfg.grad_clip:
        accel.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return parts


def on_main_process(write: Callable[[], object]) -> None:
    """Run `write` (saving a training result) in the main process only, as N processes would race
    on the same files, then wait for it, so that no process reads a half-written result."""
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        write()
    state.wait_for_everyone()


def _broadcast_from_main(model: torch.nn.Module) -> None:
    """Every process starts from the main process's weights and buffers, as DDP would make them."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(t, 0)


def _average_gradients(params: list[torch.nn.Parameter], parts: dict[str, float], weight: float) -> dict[str, float]:
    """Mean of the (loss-weighted) gradients over processes, as DDP computes it, flattened into one
    all-reduce; a parameter no process used in this step keeps grad None, as in one process.
    Returns the logged loss parts averaged the same way: those of the global batch."""
    world = torch.distributed.get_world_size()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    extra = torch.tensor([float(p.grad is not None) for p in params] + [v * weight for v in parts.values()],
                         dtype=torch.float64, device=flat.device)
    for t in (flat, extra):
        torch.distributed.all_reduce(t)
    flat, extra = flat / world, (extra / world).tolist()
    for p, g, avg, used in zip(params, grads, flat.split([g.numel() for g in grads]), extra):
        p.grad = avg.view_as(g) if used else None
    return dict(zip(parts, extra[len(params):]))


def read_log(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    return pd.read_csv(path) if path.exists() and path.stat().st_size else pd.DataFrame()


def _logged_step(path: Path) -> int:
    """The last step the log at `path` records (0: no log or no row)."""
    log = read_log(path)
    return int(log["step"].iloc[-1]) if len(log) and "step" in log else 0


def _logged_seconds(path: Path) -> float:
    log = read_log(path)
    return float(log["seconds"].iloc[-1]) if len(log) and "seconds" in log else 0.0


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows past the checkpoint we resume from, so the CSV matches the weights."""
    log = read_log(path)
    if len(log):
        _write_log(path, log[log.step <= step])


def _write_log(path: Path, log: pd.DataFrame) -> None:
    """Rewrite the whole log atomically (temporary file, then rename): a kill leaves the old or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    log.to_csv(tmp, index=False)
    tmp.replace(path)


def _append_log(path: Path, row: dict) -> None:
    log = read_log(path)
    if len(log) and set(row) - set(log.columns):
        # a new column (first evaluation): rewrite with the union of columns
        _write_log(path, pd.concat([log, pd.DataFrame([row])], ignore_index=True))
        return
    cols = list(log.columns) if len(log) else list(row)
    new = not path.exists() or not len(log)
    with path.open("a" if not new else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        if new:
            w.writeheader()
        w.writerow(row)
