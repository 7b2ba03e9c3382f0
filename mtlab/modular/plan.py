"""Assembly plans: which spans of each stack run as original layers and which as modules.

A plan gives, per stack, a sequence of span sizes read from the bottom of the stack:
`1` is one original teacher layer, `k >= 2` is the trained module that replaces the
aligned span of k layers starting there. Text form (what a person types):

    "encoder=1,1,2,2 decoder=3,3"      full names, comma-separated spans
    "e=1122 d=33"                      short names, one digit per span (when all k < 10)
    "layers=2,2,2"                     single-stack models (GPT-2, BERT, ...)

Stacks not named keep all their original layers. A plan is validated against the
stack depths and the granularities that have trained modules: it must cover every
layer once (no gap, no overlap), and a module of size k must start at a multiple of k.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Iterator, Mapping

from ..registry import Registry

ALIASES = {"e": "encoder", "enc": "encoder", "encoder": "encoder", "d": "decoder", "dec": "decoder",
           "decoder": "decoder", "l": "layers", "layers": "layers"}


class PlanError(ValueError):
    """A plan that cannot be assembled; the message names the problem and the fix."""


@dataclass(frozen=True)
class Plan:
    """Per stack, the sequence of span sizes (1 = original layer, k >= 2 = module k)."""

    spans: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, spans: Mapping[str, Iterable[int]]) -> "Plan":
        return cls(tuple((s, tuple(int(k) for k in v)) for s, v in spans.items()))

    @classmethod
    def teacher(cls, depths: Mapping[str, int]) -> "Plan":
        return cls.of({s: (1,) * n for s, n in depths.items()})

    @classmethod
    def parse(cls, text: str, depths: Mapping[str, int] | None = None) -> "Plan":
        """Read the text form (see module docstring); `depths` fills unnamed stacks with originals."""
        spans: dict[str, tuple[int, ...]] = {}
        for item in text.replace(";", " ").split():
            if "=" not in item:
                raise PlanError(f"cannot read {item!r} in plan {text!r}: write stack=spans, e.g. 'e=1,1,2,2 d=3,3'")
            name, _, body = item.partition("=")
            stack = ALIASES.get(name.strip().lower())
            if stack is None:
                raise PlanError(f"unknown stack {name!r} in plan {text!r}; use one of {sorted(set(ALIASES.values()))}")
            if stack in spans:
                raise PlanError(f"stack {stack!r} appears twice in plan {text!r}")
            # digits alone ("1122") are spans of one digit; spans of 10+ layers are comma-separated ("12," or "6,12")
            parts = [q for q in body.split(",") if q.strip()] if "," in body else list(body)
            if not parts or not all(re.fullmatch(r"\d+", p.strip()) for p in parts):
                raise PlanError(f"spans of {stack} must be positive integers, got {body!r} in plan {text!r}")
            spans[stack] = tuple(int(p) for p in parts)
        if not spans:
            raise PlanError(f"empty plan {text!r}: write e.g. 'e=1,1,2,2 d=3,3'")
        for stack, n in (depths or {}).items():
            spans.setdefault(stack, (1,) * n)
        if depths:  # keep the model's stack order
            spans = {s: spans[s] for s in depths if s in spans} | {s: v for s, v in spans.items() if s not in depths}
        return cls.of(spans)

    def __str__(self) -> str:
        short = {"encoder": "e", "decoder": "d", "layers": "layers"}
        out = []
        for s, v in self.spans:
            body = "".join(map(str, v)) if all(k < 10 for k in v) else ",".join(map(str, v)) + ("," if len(v) == 1 else "")
            out.append(f"{short.get(s, s)}={body}")
        return " ".join(out)

    def stack(self, name: str) -> tuple[int, ...]:
        return dict(self.spans)[name]

    @property
    def stacks(self) -> list[str]:
        return [s for s, _ in self.spans]

    def blocks(self, stack: str) -> list[tuple[int, int]]:
        """(start, size) of each span of a stack, bottom to top."""
        out, pos = [], 0
        for k in self.stack(stack):
            out.append((pos, k))
            pos += k
        return out

    def depth(self, stack: str) -> int:
        """Number of blocks the stack will have once assembled."""
        return len(self.stack(stack))

    def modules_used(self) -> list[tuple[str, int, int]]:
        """(stack, k, j) of each module: module j of granularity k replaces layers [j*k, (j+1)*k)."""
        return [(s, k, start // k) for s in self.stacks for start, k in self.blocks(s) if k > 1]

    def validate(self, depths: Mapping[str, int], available: Mapping[str, Iterable[int]] | None = None) -> "Plan":
        """Check coverage, alignment and module availability; return self or raise PlanError."""
        for s in self.stacks:
            if s not in depths:
                raise PlanError(f"plan names stack {s!r}, but the model has {list(depths)}")
        for s, n in depths.items():
            if s not in self.stacks:
                raise PlanError(f"plan {self} leaves stack {s!r} out: give all {n} layers, e.g. {s}={'1' * n}")
            spans = self.stack(s)
            if any(k < 1 for k in spans):
                raise PlanError(f"{s}: span sizes must be >= 1, got {spans}")
            total = sum(spans)
            if total < n:
                raise PlanError(f"{s}: plan {self} covers layers 0-{total - 1} of {n}: layers {total}-{n - 1} are "
                                f"missing (a gap); add spans that cover them")
            if total > n:
                raise PlanError(f"{s}: spans {spans} cover {total} layers but the stack has {n}: remove "
                                f"{total - n} layer(s) (the last span runs past the top)")
            ks = set(available.get(s, ())) if available is not None else None
            for start, k in self.blocks(s):
                if k == 1:
                    continue
                if start % k:
                    raise PlanError(f"{s}: module of size {k} at layer {start} is misaligned: a k-module must start "
                                    f"at a multiple of {k} (e.g. layers {start - start % k}-{start - start % k + k - 1})")
                if ks is not None and k not in ks:
                    raise PlanError(f"{s}: no trained module of granularity {k} (trained: {sorted(ks) or 'none'}); "
                                    f"train it or use another span size")
        return self

    @classmethod
    def from_ranges(cls, ranges: Mapping[str, Iterable[tuple[int, int]]], depths: Mapping[str, int]) -> "Plan":
        """Build from explicit (start, end_exclusive) ranges per stack, reporting gaps and overlaps."""
        spans = {}
        for s, rs in ranges.items():
            rs = sorted(rs)
            pos, out = 0, []
            for a, b in rs:
                if b <= a:
                    raise PlanError(f"{s}: empty or reversed range [{a}, {b})")
                if a < pos:
                    raise PlanError(f"{s}: range [{a}, {b}) overlaps the previous span ending at layer {pos - 1}")
                if a > pos:
                    raise PlanError(f"{s}: gap: layers {pos}-{a - 1} are not covered by any span")
                out.append(b - a)
                pos = b
            spans[s] = out
        return cls.of({s: spans.get(s, (1,) * n) for s, n in depths.items()}).validate(depths)


# ---- enumeration and strategies -----------------------------------------------------------

@lru_cache(maxsize=None)
def tilings(depth: int, granularities: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Every valid span sequence of one stack (aligned modules of the given sizes, or originals)."""
    ks = sorted(set(granularities) - {1})

    @lru_cache(maxsize=None)
    def from_pos(pos: int) -> tuple[tuple[int, ...], ...]:
        if pos == depth:
            return ((),)
        out = [(1,) + rest for rest in from_pos(pos + 1)]
        for k in ks:
            if pos % k == 0 and pos + k <= depth:
                out += [(k,) + rest for rest in from_pos(pos + k)]
        return tuple(out)

    return from_pos(0)


def stack_tilings(depths: Mapping[str, int], granularities: Mapping[str, Iterable[int]]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Every valid tiling of each stack."""
    return {s: tilings(depths[s], tuple(sorted(granularities.get(s, ())))) for s in depths}


def iter_plans(depths: Mapping[str, int], granularities: Mapping[str, Iterable[int]]) -> Iterator[Plan]:
    """The whole assembly space, lazily: the product of every stack's tilings (the one enumeration;
    `mtlab.explore.AssemblySpace` iterates with it)."""
    from itertools import product

    per = stack_tilings(depths, granularities)
    for combo in product(*per.values()):
        yield Plan.of(dict(zip(per, combo)))


def enumerate_plans(depths: Mapping[str, int], granularities: Mapping[str, Iterable[int]]) -> list[Plan]:
    """The whole assembly space as a list (see `iter_plans`)."""
    return list(iter_plans(depths, granularities))


def disruption(spans: tuple[int, ...]) -> tuple[int, int]:
    """How far a stack tiling departs from the teacher: (blocks removed, sum of k^2 over modules).
    Fewer removed blocks first; at equal depth, finer modules (smaller k) are preferred."""
    return (sum(spans) - len(spans), sum(k * k for k in spans if k > 1))


def stack_rungs(depth: int, granularities: Iterable[int], top_first: bool = True) -> dict[int, tuple[int, ...]]:
    """For each reachable stack depth, the least disruptive tiling with that many blocks;
    ties go to modules at the top of the stack (top layers are the most redundant)."""
    best: dict[int, tuple[int, ...]] = {}
    for t in tilings(depth, tuple(sorted(granularities))):
        n = len(t)
        # prefer modules high up: compare the reversed sequence (top span first), larger first
        key = (disruption(t)[1], tuple(-k for k in reversed(t)) if top_first else t)
        if n not in best or key < (disruption(best[n])[1], tuple(-k for k in reversed(best[n])) if top_first else best[n]):
            best[n] = t
    return dict(sorted(best.items(), reverse=True))


DEFAULT_TARGETS = (1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0)


def _combos(depths: Mapping[str, int], granularities: Mapping[str, Iterable[int]]) -> list[dict[str, tuple[int, ...]]]:
    from itertools import product

    rungs = {s: stack_rungs(n, tuple(granularities.get(s, ()))) for s, n in depths.items()}
    return [dict(zip(depths, c)) for c in product(*(r.values() for r in rungs.values()))]


def stack_ratio(spans: Mapping[str, tuple[int, ...]], block_params: Mapping[str, int]) -> float:
    """Layer-stack compression: teacher stack parameters / assembled stack parameters
    (a module has the size of one teacher block of its stack)."""
    full = sum(sum(v) * block_params[s] for s, v in spans.items())
    return full / sum(len(v) * block_params[s] for s, v in spans.items())


# ---- the strategy registry: a strategy turns a space into a ladder of plans ---------------

StrategyFn = Callable[[Mapping[str, int], Mapping[str, Iterable[int]], Mapping[str, int]], "list[Plan]"]

#: every assembly strategy, with what the studies and the assembly explorer read: label, kind ("modules":
#: the frontier's group), rank (the explorer's and tables' order), `laddered` (in the default `ladders`,
#: which the shipped bank cards and tables hold; "uniform" is offered by the explorer only)
STRATEGIES: Registry[StrategyFn] = Registry("assembly strategy", "@mtlab.modular.plan.assembly_strategy(name)",
                                             plural="assembly strategies")


def assembly_strategy(name: str, *, label: str | None = None, rank: int | None = None, laddered: bool = True,
                      description: str | None = None, **meta) -> Callable[[StrategyFn], StrategyFn]:
    """Decorator: register `fn(depths, granularities, block_params) -> [Plan, ...]` (a ladder of plans
    from mild to strong compression) as assembly strategy `name`; `ladders` and the experiments
    list every registered strategy (`laddered=False`: only when named). Registering a name again
    replaces it. The keywords are the entry's metadata in `STRATEGIES` (kind "modules")."""
    def register(fn: StrategyFn) -> StrategyFn:
        doc = (getattr(fn, "__doc__", None) or "").strip().split("\n")[0]
        STRATEGIES.add(name, fn, label=label or name, kind="modules", rank=rank, trains_per_depth=False,
                       description=description or doc, laddered=bool(laddered), **meta)
        return fn

    return register


def strategies(ladder_only: bool = True) -> tuple[str, ...]:
    """The assembly strategies `ladders` runs by default, in registration order (built in: size_first,
    speed_first); `ladder_only=False`: every registered one (also "uniform", which only the assembly
    explorer offers by default)."""
    return STRATEGIES.names(laddered=True) if ladder_only else STRATEGIES.names()


def unregister_strategy(name: str) -> None:
    STRATEGIES.unregister(name)


def ladders(depths: Mapping[str, int], granularities: Mapping[str, Iterable[int]], block_params: Mapping[str, int],
            names: Iterable[str] | None = None) -> list[tuple[str, Plan]]:
    """(strategy, plan) for the teacher (strategy "teacher") and every plan of each strategy's ladder
    (`names`, default `strategies()`: every laddered one)."""
    names = strategies() if names is None else STRATEGIES.check(names)
    out = [("teacher", Plan.teacher(depths))]
    for n in names:
        out += [(n, p) for p in STRATEGIES.get(n)(depths, granularities, block_params)]
    return out


@assembly_strategy("size_first", label="size-first", rank=1)
def size_first(depths: Mapping[str, int], granularities: Mapping[str, Iterable[int]],
               block_params: Mapping[str, int], targets: Iterable[float] = DEFAULT_TARGETS) -> list[Plan]:
    """Size-first ladder: for each target parameter ratio, the least disruptive plan that reaches it.

    Disruption of a plan = sum of k^2 over its modules, then sum over stacks of (blocks
    removed)^2: a k-module's error grows faster than k (on the bundled teacher one 6-module
    costs far more than two 3-modules), and cuts are spread over the stacks. The parameter
    axis decides the rungs. Our choice: the paper does not publish its ladder."""
    cands = _combos(depths, granularities)

    def key(c):
        return (sum(disruption(v)[1] for v in c.values()), sum(disruption(v)[0] ** 2 for v in c.values()),
                -stack_ratio(c, block_params))

    out: list[Plan] = []
    for t in targets:
        ok = [c for c in cands if stack_ratio(c, block_params) >= t - 1e-9]
        if ok:
            plan = Plan.of(min(ok, key=key))
            if plan not in out:
                out.append(plan)
    return out


def speed_first(depths: Mapping[str, int], granularities: Mapping[str, Iterable[int]],
                order: Iterable[str] = ("decoder", "layers", "encoder")) -> list[Plan]:
    """Speed-first ladder: shrink the decoder rung by rung to its shallowest tiling before
    touching the encoder (autoregressive decoding runs the decoder once per output token).
    Each rung removes one block; within a stack, the least disruptive tiling of that depth."""
    rungs = {s: list(stack_rungs(n, tuple(granularities.get(s, ()))).values()) for s, n in depths.items()}
    current = {s: r[0] for s, r in rungs.items()}
    out = []
    for s in [s for s in order if s in depths] + [s for s in depths if s not in order]:
        for tiling in rungs[s][1:]:
            current[s] = tiling
            out.append(Plan.of({x: current[x] for x in depths}))
    return out


@assembly_strategy("speed_first", label="speed-first", rank=2,
                   description="Speed-first ladder: the decoder shrunk rung by rung before the encoder.")
def _speed_first_ladder(depths: Mapping[str, int], granularities: Mapping[str, Iterable[int]],
                        block_params: Mapping[str, int]) -> list[Plan]:
    return speed_first(depths, granularities)


def uniform(depths: Mapping[str, int], k: int) -> Plan:
    """Every stack tiled by modules of one size k (layers past the last full span stay original)."""
    return Plan.of({s: (k,) * (n // k) + (1,) * (n % k) for s, n in depths.items()})


@assembly_strategy("uniform", label="uniform", rank=3, laddered=False,
                   description="Every stack tiled by one module size, one plan per size (the explorer's 'uniform').")
def uniform_ladder(depths: Mapping[str, int], granularities: Mapping[str, Iterable[int]],
                   block_params: Mapping[str, int]) -> list[Plan]:
    """One `uniform` plan per module size of the bank that tiles it validly, mild to strong compression.
    Not in the default ladders (`strategies()`), so the shipped ladders are unchanged."""
    out: list[Plan] = []
    for k in sorted({k for ks in granularities.values() for k in ks}):
        plan = uniform(depths, k)
        try:
            plan.validate(depths, granularities)
        except PlanError:
            continue
        if plan not in out:
            out.append(plan)
    return sorted(out, key=lambda p: stack_ratio(dict(p.spans), block_params))


# ---- a strategy that reads scores: the best plan under each size budget ---------------------

#: whether a higher value of a screen's (or a decoded table's) metric is better
HIGHER_IS_BETTER = {"tf_word_acc": True, "token_acc": True, "word_acc": True, "rel_word_acc": True,
                    "nll": False, "dev_nll": False, "dev_wer": False, "dev_per": False, "wer": False, "per": False,
                    "perplexity": False, "dev_perplexity": False}


def screened(scores, metric: str = "tf_word_acc", *, higher_is_better: bool | None = None,
             targets: Iterable[float] = DEFAULT_TARGETS, then: str | None = "nll") -> StrategyFn:
    """An assembly strategy that reads scores: for each target ratio, the plan with the best
    `metric` among the scored plans whose layer-stack compression reaches the target (so never a
    plan above the ratio's size budget: teacher stack parameters / target).

    `scores`: a DataFrame with a `plan` column (text form) and the metric, e.g. a screen of the
    whole assembly space on dev (`mtlab.explore.screen`, metrics nll, token_acc, tf_word_acc) or a
    frontier search's table. Scores are read on dev only: a test-split screen or a `test_*` metric
    is refused (test is held out for the final numbers). Ties (common for a word accuracy on few
    words) go to the better `then` metric where the scores have it (default the screen's token
    NLL), then to the smaller plan (higher ratio). Register it with `register_screened` or, for a
    while, `using_screen`."""
    if metric.startswith("test"):
        raise ValueError(f"metric {metric!r} is read on the test split, which is held out: choose plans on dev "
                         "(e.g. metric='tf_word_acc' of a dev screen, or 'dev_wer')")
    config = getattr(scores, "attrs", {}).get("config", {}) or {}
    if config.get("split") == "test":
        raise ValueError("these scores were screened on the test split, which is held out: screen on dev "
                         "(mtlab.explore.screen(..., split='dev'))")
    missing = [c for c in ("plan", metric) if c not in scores]
    if missing:
        raise ValueError(f"scores lack the column(s) {missing} (they have {list(scores.columns)}): pass a screen "
                         "(mtlab.explore.screen) or a table with a plan column and metric=<one of its columns>")
    if higher_is_better is None:
        if metric not in HIGHER_IS_BETTER:
            raise ValueError(f"is a higher {metric!r} better? pass higher_is_better=True or False")
        higher_is_better = HIGHER_IS_BETTER[metric]
    then = then if then and then != metric and then in scores else None
    if then is not None and then not in HIGHER_IS_BETTER:
        raise ValueError(f"is a higher {then!r} better? pass then=None or a metric of {sorted(HIGHER_IS_BETTER)}")
    table = scores[["plan", metric] + ([then] if then else [])].dropna(subset=[metric])
    dup = table.plan.astype(str)[table.plan.astype(str).duplicated()]
    if len(dup):
        raise ValueError(f"plan {dup.iloc[0]!r} is scored twice: pass one score per plan (e.g. average them first)")
    second = table[then].astype(float).tolist() if then else [0.0] * len(table)
    rows = [(str(p), float(v), w) for p, v, w in zip(table.plan, table[metric], second)]
    targets = tuple(targets)
    sign = -1.0 if higher_is_better else 1.0
    sign2 = -1.0 if then and HIGHER_IS_BETTER[then] else 1.0

    def strategy(depths: Mapping[str, int], granularities: Mapping[str, Iterable[int]],
                 block_params: Mapping[str, int]) -> list[Plan]:
        cands = []
        for text, value, tie in rows:
            try:
                plan = Plan.parse(text, depths).validate(depths, granularities)
            except PlanError as e:
                raise PlanError(f"scored plan {text!r} does not fit this model and bank ({e}): score this bank's own "
                                "assembly space (mtlab.explore.screen)") from e
            cands.append((plan, stack_ratio(dict(plan.spans), block_params), value, tie))
        out: list[Plan] = []
        for t in targets:
            ok = [c for c in cands if c[1] >= t - 1e-9]
            if ok:
                plan = min(ok, key=lambda c: (sign * c[2], sign2 * c[3] if c[3] == c[3] else float("inf"), -c[1],
                                              str(c[0])))[0]
                if plan not in out:
                    out.append(plan)
        return out

    strategy.metric = metric  # type: ignore[attr-defined]
    return strategy


def register_screened(scores, name: str = "screened", **kw) -> str:
    """Register `screened(scores, **kw)` as assembly strategy `name` (from then on `ladders` lists
    it); returns the name. `using_screen` registers it only for a `with` block."""
    assembly_strategy(name, description="The best screened plan under each size budget.")(screened(scores, **kw))
    return name


class using_screen:
    """`with using_screen(scores, metric=...):` strategy "screened" (or `name`) is registered inside
    the block only, so ladders made elsewhere (the shipped bank's card) keep the rule-based ones."""

    def __init__(self, scores, name: str = "screened", **kw):
        self.fn, self.name = screened(scores, **kw), name

    def __enter__(self) -> str:
        self.before = STRATEGIES.find(self.name)
        assembly_strategy(self.name, description="The best screened plan under each size budget.")(self.fn)
        return self.name

    def __exit__(self, *exc) -> None:
        STRATEGIES.restore(self.before, self.name)
