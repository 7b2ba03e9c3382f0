"""What a compressed model costs: parameters per component, FLOPs, measured latency.

Every helper returns a pandas DataFrame. FLOPs come from torch.utils.flop_counter,
latency from torch.utils.benchmark (median of repeated greedy generations, with the
thread count recorded, because CPU timings mean nothing without it).
"""
from __future__ import annotations

import pandas as pd
import torch
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from .anatomy import anatomy
from .tasks.base import cache_kwargs
from .tasks.guards import cap_new_tokens


def _unique_numel(params) -> int:
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_params(model) -> int:
    """Unique parameters of a module (or of an iterable of Parameters): tied (shared) Parameters
    are counted once, so a merged model shows its saving. The one parameter count of mtlab."""
    return _unique_numel(model.parameters() if isinstance(model, torch.nn.Module) else model)


def param_table(model: torch.nn.Module) -> pd.DataFrame:
    """Parameters by component: each stack's FF sublayers, the rest of its blocks
    (attention and norms), and everything outside the stacks (embeddings, head, final norms).
    Tied parameters are counted once, so a merged model with shared FF weights shows its saving."""
    ana = anatomy(model)
    rows, in_stacks = [], set()
    for name, stack in ana.stacks.items():
        block_params = [p for layer in stack.layers for p in layer.parameters()]
        ff_params = [p for i in range(len(stack)) for p in stack.layer(i).ff.params()]
        ff_ids = {id(p) for p in ff_params}
        rows.append({"component": "ff", "stack": name, "params": _unique_numel(ff_params)})
        rows.append({"component": "attention_and_norms", "stack": name,
                     "params": _unique_numel(p for p in block_params if id(p) not in ff_ids)})
        in_stacks |= {id(p) for p in block_params}
    rows.append({"component": "embeddings_and_head", "stack": "-",
                 "params": _unique_numel(p for p in model.parameters() if id(p) not in in_stacks)})
    df = pd.DataFrame(rows)
    total = _unique_numel(model.parameters())
    df.loc[len(df)] = {"component": "total", "stack": "-", "params": total}
    df["share"] = df.params / total
    df.attrs["family"] = ana.family
    return df


def stack_params(model: torch.nn.Module) -> int:
    """Parameters in the layer stacks only: the denominator of the layer-stack compression ratio."""
    ana = anatomy(model)
    return _unique_numel(p for s in ana.stacks.values() for layer in s.layers for p in layer.parameters())


def forward_flops(model: torch.nn.Module, inputs: dict) -> pd.DataFrame:
    """FLOPs of one teacher-forced forward pass, total and per top-level stack module."""
    model.eval()
    counter = FlopCounterMode(display=False, depth=None)
    with torch.no_grad(), counter:
        model(**inputs)
    counts = counter.get_flop_counts()
    ana = anatomy(model)
    rows = [{"part": "total", "flops": counter.get_total_flops()}]
    for name, stack in ana.stacks.items():
        key = next((k for k in counts if k.endswith(stack.path) or k.endswith("." + stack.path)), None)
        flops = sum(counts[key].values()) if key else sum(
            sum(v.values()) for k, v in counts.items() if k.rsplit(".", 1)[0].endswith(stack.path) and k.rsplit(".", 1)[-1].isdigit())
        rows.append({"part": name, "flops": flops})
    return pd.DataFrame(rows)


def generate_flops(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **gen) -> int:
    """FLOPs of a whole greedy generation (encoder once, decoder per step, with KV cache)."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=1,
                       **cache_kwargs(model), **gen)
    return counter.get_total_flops()


def interleaved_times(models: dict[str, torch.nn.Module], timer_for, *, rounds: int, min_run_time: float):
    """Median seconds of each model in each of `rounds` passes over all models (interleaved, so a
    slow spell of a shared machine hits every model), and how many runs each got.
    `timer_for(name, model)` returns the torch.utils.benchmark.Timer of one model."""
    times: dict[str, list[float]] = {name: [] for name in models}
    runs: dict[str, int] = dict.fromkeys(models, 0)
    for _ in range(rounds):
        for name, model in models.items():
            model.eval()
            with torch.no_grad():
                m = timer_for(name, model).blocked_autorange(min_run_time=min_run_time / rounds)
            times[name].append(m.median)
            runs[name] += len(m.times)
    return times, runs


def speedups(times: dict[str, list[float]]) -> dict[str, float]:
    """Per model: the median over rounds of the first model's time over its time in the same round."""
    import numpy as np

    first = np.array(times[next(iter(times))])
    return {name: float(np.median(first / np.array(t))) for name, t in times.items()}


# When a measured speed-up is not believed (issue #23): its per-round ratios disagree, or it is far
# from what its FLOPs allow. Such a speed-up is measured again (up to RETRIES more times, the
# reference and the suspects only) and, if it stays suspect, marked `speed_noisy`.
NOISY_SPREAD = 0.10       # interquartile range of the per-round ratios over their median
PLAUSIBLE = (0.3, 1.3)    # measured / FLOP-ideal speed-up: outside this, something else slowed a round
RETRIES = 2
QUIET = ("measure it on a quiet machine: stop other CPU jobs and rerun (e.g. `modular_table(profile, refresh=True)`, "
         "or `make report` after deleting the cached table), or raise the profile's latency_rounds")


def ratio_stats(ref: list[float], times: list[float]) -> dict:
    """The speed-up of `times` over `ref`, round by round: its median and spread (IQR / median)."""
    import numpy as np

    r = np.asarray(ref, float) / np.asarray(times, float)
    med = float(np.median(r))
    q1, q3 = np.percentile(r, [25, 75])
    return {"speedup": med, "spread": float((q3 - q1) / med) if med > 0 else float("inf")}


def suspect(stats: dict, ideal: float | None = None) -> str:
    """Why a speed-up (`ratio_stats`) is not believed, or "": rounds that disagree by more than
    NOISY_SPREAD, or a value outside PLAUSIBLE times its FLOP-ideal speed-up `ideal`."""
    if not stats["spread"] <= NOISY_SPREAD:
        return f"rounds disagree (IQR {100 * stats['spread']:.0f}% of the median)"
    if ideal is not None and ideal > 0 and not PLAUSIBLE[0] <= stats["speedup"] / ideal <= PLAUSIBLE[1]:
        return f"{stats['speedup']:.2f}x measured against {ideal:.2f}x FLOP-ideal"
    return ""


def checked_speedups(models: dict, timer_for, *, rounds: int, min_run_time: float,
                     ideal: dict[str, float] | None = None, retries: int = RETRIES):
    """`interleaved_times`, then every model's speed-up over the first one with its spread; a suspect
    speed-up (`suspect`) is measured again with the reference (up to `retries` more passes) and the
    most believable attempt kept. Returns (times, runs, stats): stats[name] has speedup, spread,
    attempts, noisy (still suspect) and note (why, and how to measure it properly)."""
    ideal = ideal or {}
    times, runs = interleaved_times(models, timer_for, rounds=rounds, min_run_time=min_run_time)
    ref = next(iter(models))
    best = {n: {**ratio_stats(times[ref], times[n]), "attempts": 1} for n in models}
    for _ in range(retries):
        bad = [n for n in models if n != ref and suspect(best[n], ideal.get(n))]
        if not bad:
            break
        more, more_runs = interleaved_times({n: models[n] for n in [ref, *bad]}, timer_for, rounds=rounds,
                                            min_run_time=min_run_time)
        for n in bad:
            runs[n] += more_runs[n]
            s = {**ratio_stats(more[ref], more[n]), "attempts": best[n]["attempts"] + 1}
            if (bool(suspect(s, ideal.get(n))), s["spread"]) < (bool(suspect(best[n], ideal.get(n))), best[n]["spread"]):
                best[n], times[n] = s, more[n]
            else:
                best[n]["attempts"] = s["attempts"]
    for n, s in best.items():
        why = suspect(s, ideal.get(n)) if n != ref else ""
        s["noisy"] = bool(why)
        s["note"] = f"{why} after {s['attempts']} measurement(s): {QUIET}" if why else ""
    return times, runs, best


def _speed(s: dict) -> dict:
    return {"speedup_vs_first": s["speedup"], "speedup_spread": s["spread"], "attempts": s["attempts"],
            "speed_noisy": s["noisy"], "speed_note": s["note"]}


def speed_columns(lat: pd.DataFrame, model: str) -> dict:
    """One model's columns of a table of models from `latency`/`encoder_latency`: `speedup_b{n}` and
    `speedup_b{n}_spread` per batch size, `speed_noisy` (any batch size still suspect after
    re-measuring: left out of frontiers and conclusions) and `speed_note` (why, and what to do)."""
    rows = lat[lat.model == model]
    if not len(rows):
        raise KeyError(f"no model {model!r} in the latency table; it has {sorted(set(lat.model))}")
    out = {}
    for r in rows.itertuples():
        out[f"speedup_b{r.batch_size}"] = r.speedup_vs_first
        out[f"speedup_b{r.batch_size}_spread"] = getattr(r, "speedup_spread", float("nan"))
    noisy = rows.speed_noisy.astype(bool) if "speed_noisy" in rows else pd.Series(False, index=rows.index)
    out["speed_noisy"] = bool(noisy.any())
    out["speed_note"] = "; ".join(f"batch {r.batch_size}: {r.speed_note}" for r in rows[noisy].itertuples())
    return out


def latency(
    models: dict[str, torch.nn.Module],
    task,
    *,
    batch_sizes=(1, 64),
    split: str = "dev",
    min_run_time: float = 1.0,
    max_new_tokens: int | None = None,
    seed: int = 0,
    rounds: int = 3,
    ideal: dict[str, float] | None = None,
    retries: int = RETRIES,
) -> pd.DataFrame:
    """Wall time of greedy `generate` per model and batch size, measured in one run so ratios
    between models are fair on a noisy machine: `rounds` passes over all models (each timing
    `min_run_time / rounds` seconds, torch.utils.benchmark), and `speedup_vs_first` is the median
    over rounds of the first model's time over this model's time IN THE SAME ROUND, so a slow
    spell on a shared machine shifts both sides of a ratio instead of one.

    Inputs are the first `batch_size` words of a fixed shuffled order of `split`; every model
    decodes exactly the same inputs. `max_new_tokens` fixes the decode length so models that
    stop early are not favoured (default: the task's length bound, cut to what every model's
    position table holds, `mtlab.tasks.guards.cap_new_tokens`).

    Every speed-up carries `speedup_spread` (IQR over median of its per-round ratios); one whose
    rounds disagree, or that is implausible against its FLOP-ideal speed-up `ideal[name]` (optional),
    is measured again (`checked_speedups`, up to `retries` times) and, still suspect, gets
    `speed_noisy` True and a `speed_note` saying how to measure it on a quiet machine."""
    import numpy as np

    rows = []
    order = task.batches(split, max(batch_sizes), shuffle=True, seed=seed)[0]
    for bs in batch_sizes:
        batch = task.collate(split, order[:bs])
        new = max_new_tokens or task.max_target_len(int(batch.attention_mask.sum(1).max()))
        new = cap_new_tokens(models, batch.input_ids.shape[1], new, explicit=max_new_tokens is not None)
        times, runs, up = checked_speedups(models, lambda name, model: benchmark.Timer(
            stmt="model.generate(input_ids=x, attention_mask=m, do_sample=False, num_beams=1, "
                 "max_new_tokens=n, min_new_tokens=n, **cache_kwargs(model))",
            globals={"cache_kwargs": cache_kwargs, "model": model, "x": batch.input_ids,
                     "m": batch.attention_mask, "n": new},
            num_threads=torch.get_num_threads(), label="generate", sub_label=name, description=f"batch {bs}"),
            rounds=rounds, min_run_time=min_run_time, ideal=ideal, retries=retries)
        for name in models:
            t = np.array(times[name])
            rows.append({"model": name, "batch_size": bs, "new_tokens": new, "seconds": float(np.median(t)),
                         "spread": float(t.max() - t.min()), "runs": runs[name], "rounds": rounds,
                         "threads": torch.get_num_threads(), **_speed(up[name])})
    return pd.DataFrame(rows)


def encoder_latency(models: dict[str, torch.nn.Module], inputs: dict[int, dict], *, min_run_time: float = 1.0,
                    rounds: int = 3, ideal: dict[str, float] | None = None, retries: int = RETRIES) -> pd.DataFrame:
    """`latency` for encoders (no generation): wall time of one forward pass per model and batch
    size, on `inputs` {batch_size: {"input_ids", "attention_mask", ...}} (every model gets the same
    tensors), timed in `rounds` interleaved passes (torch.utils.benchmark); `speedup_vs_first` is
    the median over rounds of the first model's time over this model's time in the same round,
    with its spread and the re-measuring and `speed_noisy` marks of `latency`."""
    import numpy as np

    if not models or not inputs:
        raise ValueError("encoder_latency needs at least one model and one batch of inputs")
    rows = []
    for bs, x in inputs.items():
        times, runs, up = checked_speedups(models, lambda name, model: benchmark.Timer(
            stmt="model(**x)", globals={"model": model, "x": x}, num_threads=torch.get_num_threads(),
            label="forward", sub_label=name, description=f"batch {bs}"), rounds=rounds, min_run_time=min_run_time,
            ideal=ideal, retries=retries)
        for name in models:
            t = np.array(times[name])
            rows.append({"model": name, "batch_size": bs, "tokens": int(x["attention_mask"].sum()),
                         "seconds": float(np.median(t)), "spread": float(t.max() - t.min()), "runs": runs[name],
                         "rounds": rounds, "threads": torch.get_num_threads(), **_speed(up[name])})
    return pd.DataFrame(rows)
