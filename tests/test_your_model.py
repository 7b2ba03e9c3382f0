"""Notebook 07's library side (`mtlab.experiments.your_model`, `mtlab.recipe.load_model_and_data`): a model
folder and a data file become (model, task, work folder) with checked errors, granularities fit the depth,
the merge explorer and the export work on any model, and the conclusion never hides a failed reload."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from mtlab.experiments import your_model as ym
from mtlab.profiles import PROFILES, YourModelProfile, replace
from mtlab.recipe import RecipeError, load_model_and_data

TEXT = Path(__file__).parent / "data" / "text_small.txt"
PAIRS = Path(__file__).parent / "data" / "pairs_small.tsv"
PROFILE = replace(PROFILES["smoke"], your_model=YourModelProfile(
    demo_steps=2, granularities=(2,), steps=2, batch_size=4, cka_tokens=200, eval_limit=4, screen_limit=4,
    window_sizes=(2,), align_tokens=200, recovery_steps=2))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 folder (context 64 tokens) trained 5 steps on the small text file."""
    return ym.tiny_causal_lm(tmp_path_factory.mktemp("gpt2") / "model", TEXT, steps=5, layers=2)


def test_fit_granularities_keeps_what_fits_and_adds_the_whole_depth():
    assert ym.fit_granularities((2, 3, 6), {"layers": 6}) == (2, 3, 6)
    assert ym.fit_granularities((2, 3, 6), {"layers": 4}) == (2, 3, 4)
    assert ym.fit_granularities((3, 6), {"encoder": 6, "decoder": 2}) == (2,)
    with pytest.raises(ValueError, match="FF merging only"):
        ym.fit_granularities((2, 3), {"layers": 1})


def test_replacing_config_fits_the_model(gpt2_dir):
    from transformers import AutoModelForCausalLM

    from mtlab.surgery import stack_depths

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    cfg = ym.replacing_config(model, replace(PROFILE, your_model=replace(PROFILE.your_model, granularities=(2, 3, 6))))
    assert cfg.granularities == (2,) and cfg.granularities_for(stack_depths(model)) == (2,)
    assert cfg.train.steps == 2 and cfg.train.batch_size == 4


def test_load_model_and_data_checks_like_a_recipe(gpt2_dir):
    model, task = load_model_and_data(gpt2_dir, "text", TEXT, block_size=32)
    assert type(model).__name__ == "GPT2LMHeadModel" and task.block_size == 32
    with pytest.raises(RecipeError, match="did you mean 'block_size'"):
        load_model_and_data(gpt2_dir, "text", TEXT, blocksize=32)
    with pytest.raises(RecipeError, match="decoder-only model.*use kind: text"):
        load_model_and_data(gpt2_dir, "pairs", PAIRS)
    with pytest.raises(RecipeError, match="the g2p task needs it"):
        load_model_and_data(gpt2_dir, "g2p")
    with pytest.raises(RecipeError, match="needs the data file"):
        load_model_and_data(gpt2_dir, "text")
    with pytest.raises(RecipeError, match="no file at"):
        load_model_and_data(gpt2_dir, "text", TEXT.with_name("missing.txt"))


def test_load_keys_the_work_folder_by_model_and_data(gpt2_dir, tmp_path):
    model, task, work = ym.load(gpt2_dir, TEXT, "text", PROFILE)
    assert task.name == TEXT.stem and work.is_dir()
    assert ym.load(gpt2_dir, TEXT, "text", PROFILE)[2] == work  # a rerun finds its checkpoints
    other = tmp_path / "other.txt"
    other.write_text(TEXT.read_text() + "One more line of text for another key.\n")
    assert ym.load(gpt2_dir, other, "text", PROFILE)[2] != work
    with pytest.raises(ValueError, match="TASK = 'text'"):
        ym.load(None, PAIRS, "pairs", PROFILE)
    with pytest.raises(ValueError, match="needs DATA"):
        ym.load(gpt2_dir, None, "text", PROFILE)


def test_demo_is_built_once_in_the_cache():
    folder, text = ym.demo_inputs(PROFILE)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert (folder / "config.json").exists() and len(text.read_text().splitlines()) == ym.DEMO_LINES
    assert ym.demo_inputs(PROFILE) == (folder, text)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    mine, data = ym.demo_inputs(PROFILE, TEXT)  # the demo model on your text: its own tokenizer, its own key
    assert data == TEXT and mine != folder and (mine / "tokenizer.json").exists()


def test_merge_explorer_for_scores_a_merge_of_any_model(gpt2_dir):
    from mtlab.candidate import apply
    from mtlab.merging.correlations import CorrelationCache
    from mtlab.measure import count_params

    model, task, _ = ym.load(gpt2_dir, TEXT, "text", PROFILE)
    cka = ym.similarity(model, task, PROFILE)
    assert list(cka.index) == ["layers.0", "layers.1"] and cka.values.diagonal() == pytest.approx([1, 1], abs=1e-4)
    ex = ym.merge_explorer_for(model, task, cka, PROFILE, background=False)
    spec = "layers:0-1@middle/permute"
    assert ex.specs() == [spec]
    got = ex.scores([spec])
    net = apply(model, spec, cache=CorrelationCache(model, ym._align(task), max_tokens=200))
    assert got["params"] == count_params(net) < count_params(model)
    assert got["dev_ppl"] == pytest.approx(task.evaluate(net, "dev", limit=4, progress=False)["ppl"], rel=1e-5)


def test_export_and_reload_of_a_model_whose_blocks_fill_the_context(gpt2_dir, tmp_path):
    model, task, _ = ym.load(gpt2_dir, TEXT, "text", PROFILE)
    assert task.block_size == model.config.n_positions == 64  # generate() in the check needs room
    df = ym.export_and_reload({"the original": model}, task, tmp_path, PROFILE)
    row = df.iloc[0]
    assert row.folder == "the_original" and (tmp_path / "the_original" / "config.json").exists()
    assert row.reload_with == "GPT2LMHeadModel" and row.max_logit_diff <= 1e-5
    assert row.dev_ppl == pytest.approx(row.dev_ppl_reloaded, rel=1e-6)
    assert type(ym.reload_plain(tmp_path / "the_original")).__name__ == "GPT2LMHeadModel"
    (tmp_path / "the_original" / "mtlab_export.json").unlink()
    with pytest.raises(FileNotFoundError, match="mtlab.export.export"):
        ym.reload_plain(tmp_path / "the_original")


def test_conclusion_names_a_reload_that_changed_the_scores():
    class Task:
        primary_metric, higher_is_better = "ppl", False

    ladder = pd.DataFrame({"plan": ["layers=11", "layers=2"], "params": [2e6, 1e6], "params_ratio": [1.0, 1.41],
                           "stack_ratio": [1.0, 2.0], "ideal_speedup": [1.0, 1.8], "dev_ppl": [10.0, 12.5],
                           "dev_tokens": [800, 800]})
    table = pd.DataFrame({"model": ["original", "merged", "merged", ym.CONTROL], "params": [2e6, 1.8e6, 1.8e6, 2e6],
                          "recovery_steps": [0, 0, 5, 5], "dev_ppl": [10.0, 15.0, 11.0, 9.0]})
    merge = ym.MergeResult("layers:0-1@middle/permute", pd.DataFrame(), table, torch.nn.Linear(1, 1), pd.DataFrame())
    screened = pd.DataFrame({"plan": ["layers=11", "layers=2"], "on_frontier": [True, True]})
    exported = pd.DataFrame({"model": ["a", "b"], "reload_with": ["GPT2LMHeadModel"] * 2, "dev_ppl": [12.5, 11.0],
                             "dev_ppl_reloaded": [12.5, 11.5], "max_logit_diff": [0.0, 0.3]})
    text = ym.conclusion(ladder, merge, screened, exported, Task())
    assert "on 800 dev tokens" in text and "words" not in text
    assert ("**layers=2** 1.41x fewer parameters overall (2.00x smaller stacks), 1.80x FLOP-ideal speed-up, "
            "12.5 (+2.5)") in text
    assert "removes 10.0% of the parameters: dev PPL 15 as built, 11 after 5 recovery steps (original 10" in text
    assert "the control, 9). Against the control the merge costs +2; the fine-tune alone moves the original by -1" in text
    assert "DIFFERENT dev scores for ['b']" in text
    same = ym.conclusion(ladder, merge, screened, exported.assign(dev_ppl_reloaded=exported.dev_ppl), Task())
    assert "with the same dev scores" in same


def test_labels_and_units_fit_a_text_task(gpt2_dir, tmp_path):
    """Issue 22 item 10 / issue 27 item 9: no "layers layers" header, the overall parameter ratio beside the
    stacks' ratio, counts in tokens (not words) and no word accuracy for a text task."""
    from mtlab.modular import ReplacingConfig, train_modules
    from mtlab.ui.tables import label

    model, task, work = ym.load(gpt2_dir, TEXT, "text", PROFILE)
    assert ym.count_unit(task) == "tokens"
    row = ym.summary(model, task, PROFILE)
    assert "layers" in row.columns and "layers_layers" not in row.columns and label("layers") == "layers"
    assert "dev_tokens" in row.columns and "dev_n" not in row.columns
    assert int(row.dev_tokens.iloc[0]) == task.evaluate(model, "dev", limit=4, progress=False)["tokens"]
    cfg = ym.replacing_config(model, PROFILE)
    bank, _ = train_modules(model, task, ReplacingConfig(granularities=cfg.granularities, train=cfg.train),
                            work / "modules", progress=False)
    ladder = ym.ladder_table(model, bank, task, PROFILE)
    assert {"params_ratio", "stack_ratio"} <= set(ladder.columns) and "ratio" not in ladder.columns
    assert label("params_ratio") == "params ratio, whole model (x)" and label("stack_ratio") == "stack ratio (x)"
    rung = ladder.iloc[-1]
    assert rung.params_ratio == pytest.approx(ladder.params.iloc[0] / rung.params)
    assert 1 < rung.params_ratio < rung.stack_ratio  # the embeddings stay: the model shrinks less than its stacks
    screened = ym.screen_space(model, bank, task, PROFILE)
    assert "tf_word_acc" not in screened.columns and "words" not in screened.columns and "tokens" in screened.columns
    assert screened.params_ratio.max() == pytest.approx(ladder.params_ratio.max())
    ex = ym.assembly_explorer_for(model, bank, screened, task)
    read = " ".join(ex.readouts())
    assert "tokens)" in read and "words" not in read and "word accuracy" not in read
    import transformers as T

    picked = ex.export(tmp_path / "picked")  # Export in notebook 07's explorer: a folder plain transformers loads
    assert picked is not None and T.AutoModelForCausalLM.from_pretrained(picked).config.num_hidden_layers >= 1
    cka = ym.similarity(model, task, PROFILE)
    assert cka.attrs["config"]["tokens_left_out"] == "special tokens"
    assert cka.attrs["config"]["special_ids"] == sorted(task.tokenizer.all_special_ids)
    merges = ym.merge_explorer_for(model, task, cka, PROFILE, background=False)
    assert merges.scores(merges.specs())["n_unit"] == "tokens"
    assert merges.export(tmp_path / "merged") is not None
    keys = " ".join(merges.readouts())
    assert "dev PPL" in keys and "tokens)" in keys and "words" not in keys


def test_screen_columns_in_the_units_of_each_task(g2p_task):
    """G2P examples are words (its word accuracy stays); text: tokens, no word accuracy; pairs: sentences."""
    screened = pd.DataFrame({"plan": ["e=11 d=11"], "nll": [1.0], "token_acc": [0.5], "tf_word_acc": [0.25],
                             "tokens": [40], "words": [8]})

    class Pairs:  # any task that is neither text nor G2P reads sentence pairs
        pass

    assert ym.count_unit(g2p_task) == "words" and ym.count_unit(Pairs()) == "sentences"
    assert list(ym._in_task_units(screened, g2p_task).columns) == list(screened.columns)
    pairs = ym._in_task_units(screened, Pairs())
    assert {"sentences", "tf_sentence_acc"} <= set(pairs.columns) and not {"words", "tf_word_acc"} & set(pairs.columns)
