"""mtlab.stats: the one assignment, used by both merging.align and similarity."""
from __future__ import annotations

import torch

from mtlab import similarity, stats
from mtlab.merging import align


def test_assign_is_the_one_matching():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=g, dtype=torch.float64)
    perm = torch.randperm(6, generator=g)
    corr = stats.neuron_correlation(X, X[:, perm])
    p, score = stats.assign(corr)
    assert torch.equal(X[:, perm][:, p], X) and abs(score - 1) < 1e-12
    assert torch.equal(align.match(corr), p) and similarity.match_neurons is stats.assign
    nan = corr.clone()
    nan[0] = float("nan")  # an undefined row reads as 0, no error
    assert stats.assign(nan)[0].tolist() == p.tolist()
    wide = stats.assign(corr[:, :4])  # more anchor neurons than others: unmatched rows are -1
    assert (wide[0] == -1).sum() == 2 and sorted(wide[0][wide[0] >= 0].tolist()) == [0, 1, 2, 3]
