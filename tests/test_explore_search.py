"""Frontier search over assembly spaces: its cost model, its exactness against exhaustive screening,
and its refusals."""
import numpy as np
import pytest
import torch

from mtlab.explore.screen import screen, screen_block_evals
from mtlab.explore.search import (BudgetError, compare_to_exhaustive, frontier_search, hypervolume, pareto_layers,
                                  search_evals, stack_beam_evals)
from mtlab.explore.space import AssemblySpace
from mtlab.modular import ModuleBank

WORDS = dict(limit=24, batch_size=12, progress=False)


@pytest.fixture(scope="module")
def t5_6_bank(g2p_task):
    """A 6+6 tiny T5 and a bank unlike its layers (deterministic, so scores differ plan to plan)."""
    from mtlab.teacher import TeacherConfig, build_teacher

    torch.manual_seed(0)
    teacher = build_teacher(g2p_task.tokenizer, TeacherConfig(d_model=16, d_ff=32, num_heads=2, num_layers=6,
                                                                 num_decoder_layers=6, dropout=0.1)).eval()
    torch.manual_seed(1)
    bank = ModuleBank.build(teacher, (2, 3, 6))
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return teacher, bank.train()


@pytest.fixture(scope="module")
def exhaustive(g2p_task, t5_6_bank):
    return screen(*t5_6_bank, g2p_task, **WORDS)


@pytest.mark.parametrize("depth,ks", [(6, (2, 3, 6)), (7, (2, 3)), (8, (2, 4, 8)), (5, (5,))])
def test_trie_counts_without_enumeration(depth, ks):
    space = AssemblySpace({"encoder": depth, "decoder": depth - 1}, {"encoder": ks, "decoder": (2,)})
    assert space.screen_block_evals() == screen_block_evals(list(space))
    assert space.prefixes("encoder") == len({t[:i] for t in space.tilings("encoder") for i in range(1, len(t) + 1)})
    # a beam wider than any group never scores below the top: extensions = trie nodes
    assert stack_beam_evals(depth, ks, 10**6, lambda q: 0) == space.prefixes("encoder")


def test_pareto_layers_and_hypervolume_match_brute_force():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 6, 60).astype(float), rng.integers(0, 6, 60).astype(float)
    layers = pareto_layers(x, y)
    left = set(range(60))
    for L in range(layers.max() + 1):  # peel fronts by brute force
        front = {i for i in left if not any(x[j] <= x[i] and y[j] <= y[i] and (x[j] < x[i] or y[j] < y[i])
                                             for j in left)}
        assert {i for i in left if layers[i] == L} == front
        left -= front
    # hypervolume: area of the union of boxes, counted on a fine grid of the integer lattice
    ref = (6.0, 6.0)
    grid = sum(1 for a in range(6) for b in range(6) if any(x[i] <= a and y[i] <= b for i in range(60)))
    assert hypervolume(x, y, ref) == pytest.approx(grid)
    assert hypervolume([7.0], [1.0], ref) == 0.0


@pytest.mark.parametrize("prefix_score", ["nll", "hidden"])
def test_search_scores_are_exhaustive_scores(g2p_task, t5_6_bank, exhaustive, prefix_score):
    teacher, bank = t5_6_bank
    budget = 2 * exhaustive.attrs["block_evals"] // 3
    found = frontier_search(teacher, bank, g2p_task, budget=budget, beam=2, prefix_score=prefix_score, **WORDS)
    a = found.attrs
    assert a["method"] == "frontier-search" and a["beam"] == 2
    assert a["block_evals"] == a["block_evals_stacks"] + a["block_evals_screen"] <= budget
    assert a["block_evals_stacks"] == search_evals(AssemblySpace.of(teacher, bank), 2, prefix_score) * a["batches"]
    assert a["exhaustive_block_evals"] == exhaustive.attrs["block_evals"]
    assert 0 < len(found) < len(exhaustive)
    cmp = compare_to_exhaustive(found, exhaustive)
    assert cmp["max_abs_diff"] < 1e-5  # every reported score is the exhaustive screen's score
    assert cmp["hypervolume_ratio"] >= 0.9 and cmp["frontier_recall"] >= 0.5
    # a plan on the whole space's frontier is on the search's frontier when the search found it
    full_on = set(exhaustive.plan[compare_frontier(exhaustive)])
    assert full_on & set(found.plan) <= set(found.plan[found.on_frontier_any])


def compare_frontier(df):
    from mtlab.explore.frontier import pareto_mask

    return pareto_mask(df, "ideal_speedup", "nll") | pareto_mask(df, "params", "nll", x_higher=False)


def test_budget_that_fits_the_space_screens_it_exactly(g2p_task, t5_6_bank, exhaustive):
    found = frontier_search(*t5_6_bank, g2p_task, budget=exhaustive.attrs["block_evals"], **WORDS)
    assert found.attrs["method"].startswith("exhaustive") and len(found) == len(exhaustive)
    cmp = compare_to_exhaustive(found, exhaustive)
    assert cmp["frontier_recall"] == 1.0 and cmp["hypervolume_ratio"] == pytest.approx(1.0)


def test_search_refuses_bad_input(g2p_task, t5_6_bank):
    teacher, bank = t5_6_bank
    with pytest.raises(BudgetError, match="at least"):
        frontier_search(teacher, bank, g2p_task, budget=50, **WORDS)
    with pytest.raises(ValueError, match="cannot tile"):
        frontier_search(teacher, bank, g2p_task, budget=10**6, granularities={"encoder": (8,)}, **WORDS)
    with pytest.raises(ValueError, match="one plan"):
        frontier_search(teacher, bank, g2p_task, budget=10**6, granularities={"encoder": (), "decoder": ()}, **WORDS)
    with pytest.raises(ValueError, match="no modules of granularities"):
        frontier_search(teacher, ModuleBank.build(teacher, (2,)), g2p_task, budget=10**6,
                        granularities={"encoder": (3,)}, **WORDS)
    with pytest.raises(ValueError, match="dev split"):
        frontier_search(teacher, bank, g2p_task, budget=10**6, split="test", **WORDS)
    with pytest.raises(ValueError, match="prefix_score"):
        frontier_search(teacher, bank, g2p_task, budget=400, beam=1, prefix_score="mse", **WORDS)


def test_greedy_merge_sets_agree_with_every_set(g2p_task):
    from mtlab.explore.mergesets import every_merge_set, greedy_merge_sets, greedy_vs_exhaustive
    from mtlab.teacher import TeacherConfig, build_teacher

    torch.manual_seed(0)
    model = build_teacher(g2p_task.tokenizer, TeacherConfig(d_model=16, d_ff=32, num_heads=2, num_layers=4,
                                                               num_decoder_layers=3, dropout=0.1)).eval()
    kw = dict(sizes=(2,), limit=16, align_words=32, progress=False)
    greedy = greedy_merge_sets(model, g2p_task, steps=2, **kw)
    every = every_merge_set(model, g2p_task, windows=2, **kw)
    # windows of size 2: 3 in the encoder, 2 in the decoder; sets of two non-overlapping ones
    assert len(every) == len(set(every.specs))
    assert len(every) == 1 + 3 * 2  # encoder 0-1 & 2-3, and each encoder window with each decoder window
    assert list(greedy.windows) == [1, 2] and greedy.evaluations.iloc[0] == 1 + 5  # unmerged + 5 windows
    assert greedy.evaluations.iloc[1] - 6 in (2, 3)  # the windows that do not overlap the first choice
    # the greedy 2-window set is scored exactly as the exhaustive table scores it
    row = every.set_index("specs").loc[greedy.specs.iloc[1]]
    assert row.nll == pytest.approx(greedy.nll.iloc[1], abs=1e-6)
    cmp = greedy_vs_exhaustive(greedy, every)
    assert cmp["rank"] >= 1 and cmp["gap"] >= 0 and cmp["best_nll"] == pytest.approx(every.nll.min())
    assert greedy.params.iloc[1] < greedy.params.iloc[0] < sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="dev"):
        greedy_merge_sets(model, g2p_task, split="test", **kw)
    with pytest.raises(ValueError, match="no FF window"):
        greedy_merge_sets(model, g2p_task, sizes=(9,), limit=16, progress=False)


def test_pairs_are_capped_and_still_exact(g2p_task, t5_6_bank, exhaustive, monkeypatch):
    import mtlab.explore.search as search

    monkeypatch.setattr(search, "MAX_PAIRS", 40)  # the combination's memory bound, made to bite
    found = frontier_search(*t5_6_bank, g2p_task, budget=exhaustive.attrs["block_evals"] - 1, beam=4, **WORDS)
    assert 0 < len(found) <= 40
    assert compare_to_exhaustive(found, exhaustive)["max_abs_diff"] < 1e-5


# ---- a decoder-only LM: one stack ("layers") ---------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_space():
    """A 12-layer tiny GPT-2 built from config, a bank {2,4} unlike its layers, and a text task."""
    from pathlib import Path

    import transformers as T

    from mtlab.tasks import CausalLMTask
    from mtlab.tasks.causal_lm import word_tokenizer

    text = Path(__file__).parent / "data" / "text_small.txt"
    tok = word_tokenizer(text.read_text().splitlines())
    task = CausalLMTask.from_file(text, tok, block_size=16)
    torch.manual_seed(0)
    lm = T.GPT2LMHeadModel(T.GPT2Config(n_embd=16, n_layer=12, n_head=2, vocab_size=len(tok), n_positions=32,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()
    torch.manual_seed(1)
    bank = ModuleBank.build(lm, (2, 4))
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(0.3 * torch.randn_like(p))
    full = screen(lm, bank, task, **WORDS)
    return lm, bank, task, full


@pytest.mark.parametrize("prefix_score", ["nll", "hidden"])
def test_search_on_a_decoder_only_lm_reports_exhaustive_scores(gpt2_space, prefix_score):
    lm, bank, task, full = gpt2_space
    space = AssemblySpace.of(lm, bank)
    assert space.stacks == ["layers"] and len(space) == len(full) == 125
    assert full.attrs["block_evals"] == space.screen_block_evals() * 2   # 2 batches
    budget = (search_evals(space, 2, prefix_score) + 40) * 2   # the stack search, and 40 blocks a batch to screen
    if prefix_score == "hidden":
        assert budget < full.attrs["block_evals"]
    found = frontier_search(lm, bank, task, budget=budget, beam=2, prefix_score=prefix_score, **WORDS)
    a = found.attrs
    assert a["method"] == "frontier-search" and a["beam"] == 2 and a["plans_in_space"] == 125
    assert a["block_evals"] == a["block_evals_stacks"] + a["block_evals_screen"] <= budget
    assert a["block_evals_stacks"] == search_evals(space, 2, prefix_score) * a["batches"]
    assert a["exhaustive_block_evals"] == full.attrs["block_evals"]
    assert 0 < len(found) < len(full)
    cmp = compare_to_exhaustive(found, full)
    assert cmp["max_abs_diff"] < 1e-5      # every reported score is the exhaustive screen's score
    assert cmp["hypervolume_ratio"] >= 0.9
    full_on = set(full.plan[compare_frontier(full)])   # found plans on the space's frontier are on the search's
    assert full_on & set(found.plan) and full_on & set(found.plan) <= set(found.plan[found.on_frontier_any])


def test_decoder_only_budget_that_fits_screens_exhaustively(gpt2_space):
    lm, bank, task, full = gpt2_space
    found = frontier_search(lm, bank, task, budget=full.attrs["block_evals"], **WORDS)
    assert found.attrs["method"].startswith("exhaustive") and len(found) == len(full)
    with pytest.raises(BudgetError, match="at least"):
        frontier_search(lm, bank, task, budget=20, **WORDS)


@pytest.mark.parametrize("depth,ks", [(6, (2, 3, 6)), (8, (2, 4, 8))])
def test_space_counts_and_samples_without_listing(depth, ks):
    space = AssemblySpace({"encoder": depth, "decoder": depth}, {"encoder": ks, "decoder": (2,)})
    plans = set(space)
    assert len(space) == len(plans) and space.count("encoder") == len(space.tilings("encoder"))
    sample = space.sample(20, seed=0)
    assert len(set(sample)) == 20 and set(sample) <= plans and sample == space.sample(20, seed=0)
    assert set(space.sample(len(space) + 5)) == plans


def test_space_sample_is_uniform_over_plans():
    from collections import Counter

    space = AssemblySpace({"layers": 6}, {"layers": (2, 3, 6)})   # 14 tilings; (6,) alone would be 1/4 if each
    counts = Counter(str(p) for i in range(2800) for p in space.sample(1, seed=i))   # span were drawn evenly
    assert len(counts) == 14 and 120 <= min(counts.values()) and max(counts.values()) <= 290   # 200 +- 6 sigma
