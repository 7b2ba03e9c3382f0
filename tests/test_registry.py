"""One generic registry type (`mtlab.registry.Registry`) serves every place users extend mtlab: a merge
method, a baseline and an assembly strategy registered in ONE function each are listed by the
registry, by `mtlab --help` and carry the metadata the studies read; an unknown name lists the
registered ones; the metadata reproduces what the studies hard-coded (issue #24)."""
from __future__ import annotations

import pytest
import torch

from mtlab.registry import Entry, Registry, UnknownNameError


def _cli_help(capsys) -> str:
    from mtlab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_one_generic_registry_type_serves_every_extension_point():
    from mtlab.baselines import BASELINES
    from mtlab.merging.methods import METHODS
    from mtlab.modular import STRATEGIES
    from mtlab.registries import registries
    from mtlab.tasks import TASKS
    from mtlab.tasks.metrics import METRICS

    regs = [METHODS, BASELINES, STRATEGIES, TASKS, METRICS]
    assert {type(r) for r in regs} == {Registry} and list(registries().values()) == regs
    assert METHODS.names() == ("permute", "vanilla", "permute_lowrank")
    assert BASELINES.names() == ("layer_drop", "sft", "layerdrop", "block_influence")
    assert STRATEGIES.names() == ("size_first", "speed_first", "uniform")
    assert TASKS.names() == ("g2p", "pairs", "text", "sentences")
    assert [TASKS.entry(n).kind for n in TASKS] == ["seq2seq", "seq2seq", "causal_lm", "embedding"]
    for r in regs:
        assert all(isinstance(r.entry(n), Entry) for n in r)
        table = r.table()
        assert list(table.name) == list(r.names()) and {"label", "kind", "rank", "trains_per_depth", "tasks",
                                                        "description"} <= set(table.columns)
        assert table.attrs["config"]["registry"] == r.what


@pytest.mark.parametrize("where", ["methods", "baselines", "strategies", "tasks", "metrics"])
def test_an_unknown_name_lists_the_registered_ones_and_how_to_register(where):
    from mtlab.registries import registries

    reg = dict(zip(["methods", "baselines", "strategies", "tasks", "metrics"], registries().values()))[where]
    with pytest.raises(UnknownNameError) as e:
        reg.get("no_such_entry")
    msg = str(e.value)
    assert "no_such_entry" in msg and all(n in msg for n in reg) and "register one with @mtlab." in msg
    assert isinstance(e.value, ValueError) and isinstance(e.value, KeyError)
    with pytest.raises(ValueError, match="unknown .*'no_such_entry'.*; valid "):
        reg.check(["no_such_entry"])


def test_the_old_lookups_say_the_same(g2p_task):
    from mtlab.baselines import BaselineBudget, build_baselines
    from mtlab.merging.methods import get_merge_method
    from mtlab.modular import ladders
    from mtlab.tasks.metrics import get_metric
    from mtlab.train import TrainConfig

    with pytest.raises(ValueError, match=r"unknown merge method 'nope'; valid merge methods: permute, vanilla"):
        get_merge_method("nope")
    assert get_merge_method("Permute_LowRank:r=4").name == "permute_lowrank"
    with pytest.raises(ValueError, match=r"unknown assembly strategy.*\['nope'\]; valid assembly strategies: size_first, speed_first, uniform"):
        ladders({"encoder": 2}, {"encoder": (2,)}, {"encoder": 1}, ["nope"])
    with pytest.raises(ValueError, match=r"unknown baseline.*\['nope'\].*layer_drop, sft, layerdrop, block_influence"):
        build_baselines(None, g2p_task, BaselineBudget(TrainConfig(steps=1), (1,)), ["nope"])
    with pytest.raises(ValueError, match="unknown metric 'nope'; valid metrics: bleu"):
        get_metric("nope")


def test_a_new_merge_method_in_one_function_is_listed_everywhere(capsys):
    from mtlab.merging.methods import METHODS, merge_method, merge_methods, unregister_merge_method

    @merge_method("flip", rank=4, label="flipped neurons")
    def flip(ffs, anchor, correlations):
        """Align every layer by reversing its neurons."""
        return {i: torch.arange(32).flip(0) for i in ffs if i != anchor}

    try:
        assert merge_methods()[-1] == "flip" and "flip" in merge_methods(searched=True)
        e = METHODS.entry("flip")
        assert (e.kind, e.rank, e.label, e.trains_per_depth, e.tasks) == ("merge", 4, "flipped neurons", False, ())
        assert e.description == "Align every layer by reversing its neurons." and e.supports("embedding")
        assert METHODS.names(by_rank=True) == ("permute", "vanilla", "flip", "permute_lowrank")
        assert "flip" in list(METHODS.table().name)
        assert METHODS.meta("kind")["flip"] == "merge"   # MiniLM's KIND for it
        assert "merge methods: permute, vanilla, flip, permute_lowrank" in _cli_help(capsys)
    finally:
        unregister_merge_method("flip")
    assert "flip" not in merge_methods() and "flip" not in _cli_help(capsys)


def test_a_new_baseline_in_one_function_is_listed_everywhere(capsys):
    from mtlab.baselines import BASELINES, baseline, baselines, unregister_baseline

    @baseline("bottom_only", label="bottom layers", rank=5, keep_rule="top", bundled=False)
    def bottom_only(teacher, task, budget):
        """Keep the bottom layers of every stack, no training."""
        return []

    try:
        assert baselines()[-1] == "bottom_only"
        e = BASELINES.entry("bottom_only")
        assert (e.kind, e.rank, e.label, e.trains_per_depth) == ("bottom_only", 5, "bottom layers", True)
        assert e.tasks == ("seq2seq", "causal_lm") and e.extra == {"keep_rule": "top", "bundled": False}
        # what the studies derive from the registry picks it up: MiniLM's BASELINE_RULES, the frontier's kind
        assert BASELINES.meta("keep_rule", trains_per_depth=True) == {"layer_drop": "alternate", "sft": "spread",
                                                                      "bottom_only": "top"}
        assert BASELINES.meta("kind")["bottom_only"] == "bottom_only"
        assert "bottom_only" in list(BASELINES.table().name)
        assert "baselines: sft, layer_drop, layerdrop, block_influence, bottom_only" in _cli_help(capsys)
    finally:
        unregister_baseline("bottom_only")
    assert "bottom_only" not in baselines()


def test_a_new_strategy_in_one_function_is_listed_everywhere(capsys):
    from mtlab.modular import STRATEGIES, Plan, assembly_strategy, ladders, strategies, unregister_strategy

    @assembly_strategy("encoder_first", rank=4, label="encoder first")
    def encoder_first(depths, granularities, block_params):
        """Every encoder tiling by one module size, the decoder untouched."""
        return [Plan.of({"encoder": (k,) * (depths["encoder"] // k), "decoder": (1,) * depths["decoder"]})
                for k in granularities["encoder"]]

    try:
        assert strategies() == ("size_first", "speed_first", "encoder_first")
        assert strategies(ladder_only=False) == ("size_first", "speed_first", "uniform", "encoder_first")
        e = STRATEGIES.entry("encoder_first")
        assert (e.kind, e.rank, e.label, e.extra["laddered"]) == ("modules", 4, "encoder first", True)
        got = ladders({"encoder": 6, "decoder": 6}, {"encoder": (2, 3), "decoder": (2, 3)}, {"encoder": 1, "decoder": 1})
        assert [str(p) for s, p in got if s == "encoder_first"] == ["e=222 d=111111", "e=33 d=111111"]
        assert "assembly strategies: size_first, speed_first, uniform, encoder_first" in _cli_help(capsys)
    finally:
        unregister_strategy("encoder_first")
    assert strategies() == ("size_first", "speed_first")


def test_uniform_is_registered_with_the_assembly_explorers_plans_but_not_laddered():
    from mtlab.modular import STRATEGIES, Plan, ladders, uniform
    from mtlab.modular.plan import stack_ratio

    depths, grans, bp = {"encoder": 6, "decoder": 6}, {"encoder": (2, 3, 6), "decoder": (2, 3)}, {"encoder": 1, "decoder": 2}
    got = STRATEGIES.get("uniform")(depths, grans, bp)
    # the explorer's options: uniform(depths, k) for every bank size k whose plan the bank can assemble
    assert [str(p) for p in got] == ["e=222 d=222", "e=33 d=33"]
    assert all(p == uniform(depths, k) for p, k in zip(got, (2, 3)))
    assert [stack_ratio(dict(p.spans), bp) for p in got] == sorted(stack_ratio(dict(p.spans), bp) for p in got)
    assert STRATEGIES.entry("uniform").extra["laddered"] is False
    assert "uniform" not in {s for s, _ in ladders(depths, grans, bp)}
    assert isinstance(got[0], Plan)


def test_the_registry_holds_what_the_studies_hard_coded():
    """The values experiments/merging.py RANK["method"], experiments/minilm.py KIND and BASELINE_RULES,
    experiments/artifacts.py baseline_names and profiles' merge_methods hold today, read off the registry."""
    from mtlab.baselines import BASELINES
    from mtlab.merging.methods import METHODS
    from mtlab.profiles import PROFILES

    rank = {m: METHODS.entry(m).rank for m in ("permute", "vanilla")}
    assert rank == {"permute": 1, "vanilla": 2}   # RANK["method"]: original/none 0, then these, prune 3
    kind = {"original": "teacher", "modules": "modules", **METHODS.meta("kind", searched=True),
            "layer_prune": "layer_prune", **BASELINES.meta("kind", keep_rule="alternate"),
            **BASELINES.meta("kind", keep_rule="spread")}
    assert kind == {"original": "teacher", "modules": "modules", "permute": "merge", "vanilla": "merge",
                    "layer_prune": "layer_prune", "layer_drop": "layer_drop", "sft": "sft"}
    assert BASELINES.meta("keep_rule", trains_per_depth=True) == {"layer_drop": "alternate", "sft": "spread"}
    per_depth = BASELINES.names(bundled=True, trains_per_depth=True, by_rank=True)
    once = BASELINES.names(bundled=True, trains_per_depth=False, by_rank=True)
    names = [f"{m}-{d}" for d in (4, 3, 2) for m in per_depth] + list(once)
    assert names == ["sft-4", "layer_drop-4", "sft-3", "layer_drop-3", "sft-2", "layer_drop-2", "layerdrop"]
    runs = METHODS.meta("profiles")   # the profiles whose MiniLM study runs each method
    for name, prof in PROFILES.items():
        assert prof.minilm.merge_methods == tuple(m for m, ps in runs.items() if name in ps)
    assert PROFILES["default"].minilm.merge_methods == ("permute", "vanilla")


def test_a_method_registered_before_the_profiles_are_imported_does_not_change_them():
    """Profiles are cache keys: what a test registered before `mtlab.profiles` was first imported must
    not leak into them (they are literal, the registry only describes them)."""
    import subprocess
    import sys

    code = ("from mtlab.merging.methods import merge_method\n"
            "merge_method('flip')(lambda ffs, anchor, c: {})\n"
            "from mtlab.profiles import PROFILES\n"
            "print(PROFILES['default'].minilm.merge_methods)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "('permute', 'vanilla')"


def test_registry_order_replace_filters_and_metadata():
    reg: Registry[int] = Registry("thing", "reg.register(name)", key=str.lower)
    reg.add("B", 2, rank=2, colour="red")
    reg.register("a", kind="x", tasks="embedding")(1)
    reg.add("c", 3, rank=0, trains_per_depth=True)
    assert list(reg) == ["b", "a", "c"] and len(reg) == 3 and "A" in reg and reg["A"] == 1
    assert reg.names(by_rank=True) == ("c", "b", "a")            # unranked last
    assert reg.names(task_kind="seq2seq") == ("b", "c") and reg.names(task_kind="embedding") == ("b", "a", "c")
    assert reg.names(colour="red") == ("b",) and reg.meta("colour") == {"b": "red"}
    reg.add("b", 20)                                              # replaced in place, order kept
    assert list(reg) == ["b", "a", "c"] and reg["b"] == 20
    assert reg.update("c", rank=5, note="n").extra == {"note": "n"} and reg.entry("c").rank == 5
    old = reg.find("a")
    reg.unregister("a")
    assert list(reg) == ["b", "c"] and reg.find("a") is None
    reg.restore(old, "a")
    assert reg["a"] == 1
    with pytest.raises(ValueError, match="unknown task kind.*'images'.*seq2seq"):
        reg.add("d", 4, tasks=("images",))
