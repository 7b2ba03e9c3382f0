"""`mtlab study`: the report's four tables for a user's model, from a recipe (issue #24)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from mtlab.recipe import load_recipe
from mtlab.study import TABLES, study
from models import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "text_small.txt"
PAIRS = ROOT / "tests" / "data" / "pairs_small.tsv"
SMOKE = {"cka_tokens": 200, "speed_batch_sizes": [1, 4], "speed_seconds": 0.05, "speed_rounds": 2}


def _llama(tmp_path: Path) -> str:
    return tiny_llama(tmp_path).name


def _bart(tmp_path: Path) -> str:
    import torch
    import transformers as T

    from mtlab.tasks.causal_lm import word_tokenizer

    tok = word_tokenizer(PAIRS.read_text().replace("\t", " ").splitlines())
    torch.manual_seed(0)
    model = T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=len(tok), d_model=16, encoder_layers=4, decoder_layers=4, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0, forced_eos_token_id=None))
    model.save_pretrained(tmp_path / "bart")
    tok.save_pretrained(tmp_path / "bart")
    return "bart"


def _bert(tmp_path: Path) -> str:
    """A tiny BERT-style encoder from a config, with the real all-MiniLM-L6-v2 tokenizer (offline)."""
    import torch
    import transformers as T

    from mtlab.minilm import model_dir

    tok = T.AutoTokenizer.from_pretrained(str(model_dir()))
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=4,
                                     num_attention_heads=2, intermediate_size=48, max_position_embeddings=64))
    model.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    return "bert"


def _recipe(model: str, task: dict, depths) -> dict:
    return {"model": model, "task": task, "output": "out",
            "modules": {"granularities": [2, 4], "steps": 3, "batch_size": 8, "screen": False},
            "merge": {"window_search": {"sizes": [2], "starts": [1], "select_limit": 4}, "align_tokens": 200,
                      "recovery": {"steps": 2, "batch_size": 8}},
            "baselines": {"names": ["sft", "layer_drop"], "depths": depths, "steps": 2, "batch_size": 8},
            "eval": {"split": "dev", "limit": 8}, "study": SMOKE}


@pytest.mark.parametrize("make, task, metric", [
    (_llama, {"kind": "text", "path": str(TEXT), "block_size": 16}, "dev_ppl"),
    (_bart, {"kind": "pairs", "path": str(PAIRS), "metric": "chrf", "max_target_len": 12}, "dev_chrf"),
    (_bert, {"kind": "sentences", "max_length": 32}, "dev_mean_cos"),
])
def test_study_writes_the_four_tables_for_a_users_model(tmp_path, make, task, metric):
    name = make(tmp_path)
    res = study(load_recipe(_recipe(name, task, [2]), base=tmp_path), progress=False)
    out = tmp_path / "out"
    for t in TABLES:
        assert (out / f"{t}.csv").is_file(), t
        assert len(pd.read_csv(out / f"{t}.csv")), t
    assert res.metric == metric
    mod = res.tables["modular"]
    assert set(mod.kind) == {"original", "modules", "baseline"}
    assert set(mod[mod.kind == "baseline"].method) == {"sft", "layer_drop"}
    assert {"size_first", "speed_first"} <= {s for v in mod[mod.kind == "modules"].strategy for s in v.split(", ")}
    assert mod[metric].notna().all() and mod.dev_n.nunique() == 1 and mod.dev_n.iloc[0] > 0  # the same examples
    mer = res.tables["merge"]
    assert {"merge", "prune", "control"} <= set(mer.kind)
    assert {"before recovery", "recovered"} <= set(mer.stage)
    fr = res.tables["frontier"]
    assert fr.on_frontier.any() and {"speedup_b1", "speedup_b4"} <= set(fr.columns)
    assert "before recovery" not in set(fr.stage.dropna()) and fr.speedup_b4.notna().all()  # each model timed once
    sim = res.tables["similarity"]
    assert set(sim.point) == {"ff_out", "attn_out"}
    diag = sim[(sim.row == sim.col)].value
    assert diag.sub(1).abs().max() < 1e-4  # CKA of a layer with itself is 1
    page = (out / "index.html").read_text()
    assert all(f"{t}.csv" in page for t in TABLES) and "NaN" not in page and str(tmp_path) not in page
    budget = pd.read_csv(out / "method_budget.csv").set_index("method")
    assert budget.loc["modules", "train_runs"] == 1 and budget.loc["sft", "train_runs"] == 1


def test_a_study_folder_of_another_model_is_refused(tmp_path):
    from mtlab.recipe import RecipeError

    name = _llama(tmp_path)
    recipe = _recipe(name, {"kind": "text", "path": str(TEXT), "block_size": 16}, [2])
    recipe = {**recipe, "modules": None, "merge": None, "study": SMOKE}
    study(load_recipe(recipe, base=tmp_path), progress=False)
    import torch

    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tmp_path / name)
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight.add_(0.1)
    m.save_pretrained(tmp_path / name)
    with pytest.raises(RecipeError, match="fresh"):
        study(load_recipe(recipe, base=tmp_path), progress=False)


def test_every_example_folder_has_a_study_recipe_that_validates():
    from mtlab.recipe_schema import load_recipe as load

    folders = [p for p in (ROOT / "examples").iterdir() if p.is_dir() and (p / "recipe.yaml").exists()]
    assert folders and all((p / "study.yaml").is_file() for p in folders)
    for p in folders:
        assert load(p / "study.yaml").study.speed_batch_sizes  # the schema reads it (typed, no unknown keys)


@pytest.mark.slow
def test_the_tiny_gpt2_example_study_runs_from_the_cli(tmp_path):
    """`mtlab study examples/tiny_gpt2/study.yaml --out DIR` on a copy of the example (its model built)."""
    from mtlab.cli import main
    from models import tiny_gpt2_example

    example = tiny_gpt2_example(tmp_path / "repo", steps=20)
    out = tmp_path / "study"
    assert main(["study", str(example / "study.yaml"), "--out", str(out), "--no-progress"]) == 0
    for t in (*TABLES, "method_budget"):
        assert len(pd.read_csv(out / f"{t}.csv")), t
    mod = pd.read_csv(out / "modular.csv")
    assert set(mod[mod.kind == "baseline"].stack_ratio.round(2)) == {4.0, 2.0, 1.33}  # every depth: 1, 2, 3 of 4
    assert (out / "index.html").is_file()


def test_kind_sentences_refuses_a_model_that_is_not_an_encoder(tmp_path):
    from mtlab.recipe import RecipeError, load_model_and_task

    name = _llama(tmp_path)
    recipe = _recipe(name, {"kind": "sentences"}, [2])
    with pytest.raises(RecipeError, match="not an encoder"):
        load_model_and_task(load_recipe(recipe, base=tmp_path))
    with pytest.raises(RecipeError, match="max_length: only for kind: sentences"):
        load_recipe(_recipe(name, {"kind": "text", "path": str(TEXT), "max_length": 8}, [2]), base=tmp_path)
