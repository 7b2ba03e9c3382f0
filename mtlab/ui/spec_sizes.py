"""Parameter counts of merge and prune specs without building or scoring the model: what the merge
explorer needs to pick layer pruning at the closest size not larger than a merge, at once."""
from __future__ import annotations

import re

from torch import nn

from ..anatomy import anatomy
from ..merging.merge import MergeSpec
from ..measure import count_params

PRUNE = re.compile(r"^prune\s+(?P<stack>[A-Za-z_][\w.]*):(?P<a>\d+)-(?P<b>\d+)$")


class SpecSizes:
    """`sizes(specs) -> int`: parameters of `model` with the specs applied, counted from the model's
    anatomy. A merge of layers L ties every non-anchor FF sublayer to the anchor's (their w_in,
    w_gate, w_out weights and biases are removed); "prune STACK:A-B" drops blocks A+1..B. Equals
    `count_params(apply(model, specs))` for specs whose windows do not overlap."""

    def __init__(self, model: nn.Module):
        ana = anatomy(model)
        self.total = count_params(model)
        self.ff, self.block = {}, {}
        for s in ana.stacks:
            for i, layer in enumerate(ana.stack(s)):
                self.ff[s, i] = sum(p.numel() for p in layer.ff.params())
                self.block[s, i] = sum(p.numel() for p in layer.block.parameters())

    def removed(self, spec: str) -> int:
        m = PRUNE.match(spec.strip())
        if m:
            s, a, b = m["stack"], int(m["a"]), int(m["b"])
            return sum(self._get(self.block, s, i) for i in range(a + 1, b + 1))
        ms = MergeSpec.parse(spec)
        anchor = ms.anchor_layer()
        return sum(self._get(self.ff, ms.stack, i) for i in ms.layers if i != anchor)

    def _get(self, table: dict, stack: str, i: int) -> int:
        if (stack, i) not in table:
            raise ValueError(f"no layer {stack}.{i} in this model; its layers are "
                             f"{sorted(f'{s}.{j}' for s, j in table)}: fix the spec")
        return table[stack, i]

    def __call__(self, specs: list[str]) -> int:
        return self.total - sum(self.removed(s) for s in specs)
