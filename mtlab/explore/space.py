"""The spaces of compressed models one training run and one set of merges can produce.

- `AssemblySpace`: every valid plan (each stack tiled by aligned spans of original layers and
  trained modules); the product of the stacks' tilings. 14 x 14 = 196 plans for the 6+6
  teacher with granularities {2, 3, 6}.
- `MergeSpace`: per stack, every contiguous window of >= 2 FF sublayers, and every set of
  non-overlapping windows over all stacks (one tied FF per window).
- `CombinedSpace`: an assembly, then FF merges inside the assembled model (windows over the
  assembled stack's blocks).

Each space reports its size without materialising it (`len`) and iterates lazily, so a user can
see how large a space is before deciding what to screen.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import product
from typing import Iterable, Iterator, Mapping

from ..modular.plan import Plan, iter_plans, stack_tilings


@dataclass(frozen=True)
class AssemblySpace:
    """Every plan over `depths` with modules of `granularities` (per stack)."""

    depths: Mapping[str, int]
    granularities: Mapping[str, tuple[int, ...]]

    @classmethod
    def of(cls, teacher, bank) -> "AssemblySpace":
        from ..surgery import stack_depths

        return cls(stack_depths(teacher), dict(bank.granularities) if bank is not None else {})

    def tilings(self, stack: str) -> tuple[tuple[int, ...], ...]:
        return stack_tilings({stack: self.depths[stack]}, self.granularities)[stack]

    @property
    def stacks(self) -> list[str]:
        return list(self.depths)

    def count(self, stack: str) -> int:
        """Tilings of one stack, counted (`_ways`) without listing them."""
        return self._ways(stack)[0]

    def __len__(self) -> int:
        n = 1
        for s in self.stacks:
            n *= self.count(s)
        return n

    def _ways(self, stack: str) -> list[int]:
        """ways[pos]: tilings of the layers from `pos` to the top (ways[depth] = 1)."""
        depth, ks = self.depths[stack], sorted(set(self.granularities.get(stack, ())) - {1})
        ways = [0] * depth + [1]
        for pos in range(depth - 1, -1, -1):
            ways[pos] = sum(ways[pos + k] for k in [1, *ks] if pos + k <= depth and (k == 1 or pos % k == 0))
        return ways

    def sample(self, n: int, seed: int = 0) -> list[Plan]:
        """`n` distinct plans drawn uniformly from the space (all of them if it has no more), without
        listing it: each span is drawn with the share of tilings that continue from it."""
        import random

        if n >= len(self):
            return list(self)
        rng, ways, out = random.Random(seed), {s: self._ways(s) for s in self.stacks}, {}
        while len(out) < n:
            spans = {}
            for s in self.stacks:
                pos, t, depth, ks = 0, [], self.depths[s], sorted(set(self.granularities.get(s, ())) - {1})
                while pos < depth:
                    opts = [k for k in [1, *ks] if pos + k <= depth and (k == 1 or pos % k == 0)]
                    k = rng.choices(opts, weights=[ways[s][pos + k] for k in opts])[0]
                    t.append(k)
                    pos += k
                spans[s] = tuple(t)
            plan = Plan.of(spans)
            out.setdefault(str(plan), plan)
        return list(out.values())

    def __iter__(self) -> Iterator[Plan]:
        return iter_plans(self.depths, self.granularities)

    def prefixes(self, stack: str) -> int:
        """Distinct non-empty prefixes of the stack's tilings (its screening trie's nodes), counted
        by the number of ways to reach each layer boundary, without listing the tilings."""
        depth, ks = self.depths[stack], sorted(set(self.granularities.get(stack, ())) - {1})
        ways = [1] + [0] * depth
        for pos in range(depth):
            for k in [1, *ks]:
                if pos + k <= depth and (k == 1 or pos % k == 0):
                    ways[pos + k] += ways[pos]
        return sum(ways[1:])

    def screen_block_evals(self) -> int:
        """Blocks one batch costs when `mtlab.explore.screen` screens the whole space: every encoder
        prefix once, every decoder prefix once per encoder tiling; a decoder-only LM's one trie."""
        if self.stacks == ["layers"]:  # a decoder-only LM: one trie
            return self.prefixes("layers")
        if self.stacks != ["encoder", "decoder"]:
            raise ValueError(f"screen_block_evals needs stacks encoder, decoder (or one stack, layers); this "
                             f"space has {self.stacks}")
        return self.prefixes("encoder") + len(self.tilings("encoder")) * self.prefixes("decoder")

    def sizes(self) -> dict[str, int]:
        """Tilings per stack and the total number of plans."""
        return {**{s: len(self.tilings(s)) for s in self.stacks}, "plans": len(self)}


def window_sets(depth: int, sizes: Iterable[int] | None = None) -> list[tuple[tuple[int, int], ...]]:
    """Every set of non-overlapping windows (start, size >= 2) of one stack, the empty set first."""
    sizes = tuple(range(2, depth + 1)) if sizes is None else tuple(sorted({int(k) for k in sizes if 2 <= k <= depth}))
    return list(_window_sets(depth, sizes))


@lru_cache(maxsize=None)
def _window_sets(depth: int, sizes: tuple[int, ...]) -> tuple[tuple[tuple[int, int], ...], ...]:
    @lru_cache(maxsize=None)
    def from_pos(pos: int) -> tuple[tuple[tuple[int, int], ...], ...]:
        if pos >= depth:
            return ((),)
        out = list(from_pos(pos + 1))  # layer `pos` in no window
        for k in sizes:
            if pos + k <= depth:
                out += [((pos, k),) + rest for rest in from_pos(pos + k)]
        return tuple(out)

    return tuple(sorted(from_pos(0), key=lambda ws: (len(ws), ws)))


@dataclass(frozen=True)
class MergeSpace:
    """Per stack, windows of FF sublayers to merge; `sizes` limits window sizes (None: 2..depth)."""

    depths: Mapping[str, int]
    sizes: tuple[int, ...] | None = None

    def windows(self, stack: str) -> list[tuple[int, int]]:
        return [ws[0] for ws in window_sets(self.depths[stack], self.sizes) if len(ws) == 1]

    def __len__(self) -> int:
        """Non-empty combinations of non-overlapping windows over all stacks."""
        n = 1
        for s, d in self.depths.items():
            n *= len(window_sets(d, self.sizes))
        return n - 1

    def __iter__(self) -> Iterator[dict[str, tuple[tuple[int, int], ...]]]:
        stacks = list(self.depths)
        for combo in product(*(window_sets(self.depths[s], self.sizes) for s in stacks)):
            if any(combo):
                yield dict(zip(stacks, combo))


def merge_specs(windows: Mapping[str, Iterable[tuple[int, int]]], anchor: str = "middle",
                method: str = "permute") -> list[str]:
    """Merge-spec strings (`stack:a-b@anchor/method`, `str(MergeSpec)`) for a set of windows."""
    from ..merging.merge import MergeSpec

    return [str(MergeSpec(s, tuple(range(a, a + k)), anchor, method)) for s, ws in windows.items() for a, k in ws]


@dataclass(frozen=True)
class CombinedSpace:
    """An assembly plan, then merges of FF windows inside the assembled stacks."""

    assemblies: AssemblySpace
    sizes: tuple[int, ...] | None = None

    def __len__(self) -> int:
        """Pairs (plan, merge set), the empty merge set included (the plain assemblies)."""
        per = {s: {t: len(window_sets(len(t), self.sizes)) if len(t) >= 2 else 1 for t in self.assemblies.tilings(s)}
               for s in self.assemblies.stacks}
        n = 1
        for s in per:
            n *= sum(per[s].values())
        return n

    def __iter__(self) -> Iterator[tuple[Plan, dict[str, tuple[tuple[int, int], ...]]]]:
        for plan in self.assemblies:
            depths = {s: plan.depth(s) for s in plan.stacks}
            options = [window_sets(d, self.sizes) if d >= 2 else [()] for d in depths.values()]
            for combo in product(*options):
                yield plan, dict(zip(depths, combo))


def space_sizes(teacher, bank, merge_sizes: tuple[int, ...] | None = None) -> dict[str, int]:
    """Sizes of the three spaces for a teacher and its module bank."""
    from ..surgery import stack_depths

    a = AssemblySpace.of(teacher, bank)
    m = MergeSpace(stack_depths(teacher), merge_sizes)
    return {**{f"{s}_tilings": len(a.tilings(s)) for s in a.stacks}, "assembly_plans": len(a),
            "merge_sets": len(m), "combined": len(CombinedSpace(a, merge_sizes))}
