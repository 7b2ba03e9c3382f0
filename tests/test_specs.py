"""Typed specs: PruneSpec and MergeSpec round-trip through their text forms, parsed in one place each."""
from __future__ import annotations

import pytest

from mtlab.explore.space import merge_specs
from mtlab.merging.merge import MergeSpec
from mtlab.merging.spec import PruneSpec, candidate_spec


def test_prune_spec_round_trip_and_errors():
    p = PruneSpec.parse("  prune decoder:1-3 ")
    assert p == PruneSpec("decoder", 1, 3) == PruneSpec.window("decoder", 1, 3)
    assert str(p) == "prune decoder:1-3" and PruneSpec.parse(str(p)) == p and p.size == 3 and p.dropped() == [2, 3]
    for bad in ("prune decoder:1", "prune 1-3", "prune decoder:a-b"):
        with pytest.raises(ValueError, match="prune STACK:START-END"):
            PruneSpec.parse(bad)
    assert candidate_spec("prune encoder:0-1") == PruneSpec("encoder", 0, 1)
    assert candidate_spec("encoder:0-1@middle/vanilla") == MergeSpec("encoder", (0, 1), "middle", "vanilla")


def test_merge_spec_text_comes_from_its_str():
    assert merge_specs({"encoder": [(0, 3)], "decoder": [(2, 2)]}) == ["encoder:0-2@middle/permute",
                                                                       "decoder:2-3@middle/permute"]
    for text in ("encoder:0-2@middle/permute", "layers:0,2,5@2/vanilla"):
        assert str(MergeSpec.parse(text)) == text


def test_split_by_hash_is_both_old_splits():
    import hashlib
    import random

    from mtlab.tasks import split_by_hash
    from mtlab.tasks.g2p import split_of as g2p_split
    from mtlab.tasks.pairs import split_of as pairs_split

    def old_g2p(word):
        h = int.from_bytes(hashlib.sha1(word.encode("utf-8")).digest()[:4], "big") % 100
        return "train" if h < 90 else "dev" if h < 95 else "test"

    def old_pairs(s, dev=0.05, test=0.05):
        u = int.from_bytes(hashlib.sha1(s.encode("utf-8")).digest()[:8], "big") / 2.0**64
        return "train" if u < 1.0 - dev - test else "dev" if u < 1.0 - test else "test"

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 8))) for _ in range(3000)]
    assert [g2p_split(w) for w in words] == [old_g2p(w) for w in words]
    assert [pairs_split(w, 0.1, 0.2) for w in words] == [old_pairs(w, 0.1, 0.2) for w in words]
    assert {g2p_split(w) for w in words} == {"train", "dev", "test"}
    with pytest.raises(ValueError, match="whole-percent"):
        split_by_hash("x", 0.015, 0.05, scheme="percent")
