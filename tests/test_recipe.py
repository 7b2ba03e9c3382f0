"""`mtlab run recipe.yaml`: the example recipes end to end, validation errors that name the field and
the fix, and the CLI's --version, choices and help."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

import mtlab
from mtlab.cli import build_parser, main
from mtlab.recipe import RecipeError, load_recipe, run_recipe

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TEXT = ROOT / "tests" / "data" / "text_small.txt"


@pytest.fixture(scope="module")
def gpt2_example(tmp_path_factory):
    """examples/tiny_gpt2 copied into a tmp tree that keeps its relative paths, with its model built."""
    from models import tiny_gpt2_example

    return tiny_gpt2_example(tmp_path_factory.mktemp("repo"), steps=40)


def _check_output(out: Path, df: pd.DataFrame, metric: str) -> None:
    on_disk = pd.read_csv(out / "results.csv")
    assert list(on_disk.name) == list(df.name) and on_disk.name.iloc[0] == "original"
    assert {"modules", "merge", "baseline"} <= set(df.kind)
    compressed = ~df.kind.isin(["original", "control"])  # the control: the original fine-tuned like the merges
    assert df[metric].notna().all() and (df.compression[compressed] > 1).all()
    for path in df.path.dropna():
        assert (out / path / "config.json").exists() and (out / path / "model.safetensors").exists()
    page = (out / "summary.html").read_text()
    assert all(name in page for name in df.name) and "Recipe" in page
    assert not list(out.rglob("*.tmp"))


def test_tiny_gpt2_example_end_to_end(gpt2_example, tmp_path):
    from transformers import AutoModelForCausalLM

    from mtlab.tasks import CausalLMTask

    out = tmp_path / "out"
    assert main(["run", str(gpt2_example / "recipe.yaml"), "--output", str(out), "--no-progress"]) == 0
    df = pd.read_csv(out / "results.csv")
    _check_output(out, df, "test_ppl")
    assert (out / "screen.csv").exists() and (out / "window_search.csv").exists()
    assert set(pd.read_csv(out / "screen.csv").plan) >= {"layers=22", "layers=4"}
    # a saved model is a plain transformers folder that scores what the table says
    row = df[df.kind == "merge"].iloc[0]
    model = AutoModelForCausalLM.from_pretrained(out / row.path)
    recipe = yaml.safe_load((gpt2_example / "recipe.yaml").read_text())
    task = CausalLMTask.from_file(TEXT, str(out / row.path), block_size=recipe["task"]["block_size"])
    got = task.evaluate(model, "test", limit=recipe["eval"]["limit"], progress=False)
    assert got["ppl"] == pytest.approx(row.test_ppl, rel=1e-4)


@pytest.mark.slow
def test_g2p_example_end_to_end(tmp_path):
    out = tmp_path / "out"
    df = run_recipe(EXAMPLES / "g2p_teacher" / "recipe.yaml", output=out, progress=False)
    _check_output(out, df, "test_wer")
    assert set(df.spec[df.kind == "modules"]) == {"e=33 d=33", "e=111111 d=33"}


def test_rerun_resumes_and_another_recipe_is_refused(gpt2_example, tmp_path):
    data = yaml.safe_load((gpt2_example / "recipe.yaml").read_text())
    small = {**data, "modules": {**data["modules"], "steps": 2, "screen": False}, "merge": None, "baselines": None,
             "eval": {"split": "dev", "limit": 4}}
    small = {k: v for k, v in small.items() if v is not None}
    first = run_recipe(load_recipe(small, base=gpt2_example), output=tmp_path / "o", progress=False)
    again = run_recipe(load_recipe(small, base=gpt2_example), output=tmp_path / "o", progress=False)
    timing = [c for c in first.columns if c.endswith("_seconds")]
    assert first.drop(columns=timing).equals(again.drop(columns=timing))
    other = {**small, "seed": 1}
    with pytest.raises(RecipeError, match="another recipe"):
        run_recipe(load_recipe(other, base=gpt2_example), output=tmp_path / "o", progress=False)


# ---- validation --------------------------------------------------------------------------------

BASE = {"model": "tiny-gpt2", "task": {"kind": "text", "path": str(TEXT)}, "output": "out",
        "modules": {"granularities": [2], "steps": 1}}


def _err(data: dict, base: Path | None = None) -> str:
    with pytest.raises(RecipeError) as e:
        r = load_recipe(data, base=base)
        run_recipe(r, progress=False)
    return str(e.value)


@pytest.mark.parametrize("change,field,fix", [
    ({"modles": {}}, "modles", "did you mean 'modules'"),
    ({"task": {"kind": "txt", "path": "x"}}, "task.kind", "'g2p', 'pairs', 'text' or 'sentences'"),
    ({"task": {"kind": "text"}}, "task", "path: data/train.txt"),
    ({"task": {"kind": "g2p"}}, "model", "model: bundled"),
    ({"task": {"kind": "text", "path": "x", "max_target_len": 8}}, "task", "max_target_len: only for kind: pairs"),
    ({"modules": {"granularities": [1, 2]}}, "modules.granularities", "granularities: [2, 3]"),
    ({"modules": {"plans": ["layers=2x"]}}, "modules.plans", "positive integers"),
    ({"modules": {"steps": 0}}, "modules.steps", "greater than or equal to 1"),
    ({"modules": None}, "(top level)", "nothing to do"),
    ({"merge": {"sets": ["layers:1-2@middle/nope"]}}, "merge.sets", "nope"),
    ({"baselines": {"names": ["sfft"], "depths": [2]}}, "baselines.names", "sft"),
    ({"baselines": {"names": ["sft"]}}, "baselines.depths", "required"),
])
def test_schema_errors_name_the_field_and_the_fix(change, field, fix):
    data = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    msg = _err(data)
    assert f"{field}:" in msg and fix in msg


def test_model_checks_name_the_fix(gpt2_example, tmp_path):
    base = {**BASE, "output": str(tmp_path / "never")}
    msg = _err({**base, "modules": {"granularities": [2, 3, 6]}}, gpt2_example)
    assert "modules.granularities" in msg and "[6] impossible for the 4-layer stack" in msg \
        and "granularities: [2, 3, 4]" in msg
    assert "modules.plans" in _err({**base, "modules": {"granularities": [2], "plans": ["layers=4"]}}, gpt2_example)
    assert "merge.sets" in _err({**base, "merge": {"sets": ["layers:2-9@middle/permute"]}}, gpt2_example)
    assert "baselines.depths" in _err({**base, "baselines": {"depths": [4]}}, gpt2_example)
    assert "task.block_size" in _err({**base, "task": {"kind": "text", "path": str(TEXT), "block_size": 999}},
                                     gpt2_example)
    assert "task.path: no file" in _err({**base, "task": {"kind": "text", "path": "nowhere.txt"}}, gpt2_example)
    assert "model: cannot load" in _err({**base, "model": str(tmp_path / "nothing")})
    assert not (tmp_path / "never").exists()  # nothing written for a recipe that cannot run


# ---- the command line ---------------------------------------------------------------------------

def test_cli_version_and_profile_choices(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mtlab {mtlab.__version__}"
    with pytest.raises(SystemExit) as e:
        main(["report", "--profile", "smok"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'smok'" in err and "smoke" in err


def test_cli_every_option_has_help():
    def actions(parser):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    yield from actions(sub)
            elif not isinstance(a, argparse._HelpAction):
                yield a

    missing = [a.dest for a in actions(build_parser()) if not a.help]
    assert not missing


def test_cli_bad_recipe_is_one_message_not_a_traceback(tmp_path):
    bad = tmp_path / "recipe.yaml"
    bad.write_text("model: bundled\ntask: {kind: g2p}\noutput: out\nmodules: {stesp: 3}\n")
    run = subprocess.run([sys.executable, "-m", "mtlab", "run", str(bad)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "modules.stesp: unknown key; did you mean 'steps'?" in run.stderr
    assert not (tmp_path / "out").exists()


def test_check_only_validates(gpt2_example, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["run", str(gpt2_example / "recipe.yaml"), "--check", "--output", str(out)]) == 0
    assert "valid" in capsys.readouterr().out and not out.exists() and not (gpt2_example / "out").exists()


def test_llama_recipe_with_ladders_and_every_baseline(tmp_path):
    """A Llama-style (GLU) model: every registered assembly strategy, merges found by window search."""
    import transformers as T

    from models import tiny_llama

    tiny_llama(tmp_path)
    recipe = {"model": "llama", "task": {"kind": "text", "path": str(TEXT), "block_size": 16}, "output": "out",
              "modules": {"granularities": [2, 4], "steps": 3, "batch_size": 8, "screen": False},
              "merge": {"window_search": {"sizes": [2], "starts": [2], "select_limit": 4}, "align_tokens": 200,
                        "recovery": {"steps": 2, "batch_size": 8}},
              "baselines": {"names": ["sft", "layer_drop"], "depths": [2], "steps": 2, "batch_size": 8},
              "eval": {"split": "dev", "limit": 8}}
    df = run_recipe(load_recipe(recipe, base=tmp_path), progress=False)
    assert len(df[df.kind == "modules"]) >= 2 and "layers=22" in set(df.spec)
    assert set(df.spec[df.kind == "merge"]) == {"layers:2-3@middle/permute"}
    assert len(df[df.kind == "baseline"]) == 2 and df.dev_ppl.notna().all()
    from mtlab.tasks import CausalLMTask

    task = CausalLMTask.from_file(TEXT, tmp_path / "llama", block_size=16)
    for row in df.dropna(subset=["path"]).itertuples():
        reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / row.path)
        assert reloaded.config.num_hidden_layers == len(reloaded.model.layers)
        assert task.evaluate(reloaded, "dev", limit=8, progress=False)["ppl"] == pytest.approx(row.dev_ppl, rel=1e-4)


def test_pairs_recipe_on_a_seq2seq_model(tmp_path):
    import torch
    import transformers as T

    from mtlab.tasks.causal_lm import word_tokenizer

    pairs = ROOT / "tests" / "data" / "pairs_small.tsv"
    tok = word_tokenizer(pairs.read_text().replace("\t", " ").splitlines())
    torch.manual_seed(0)
    model = T.T5ForConditionalGeneration(T.T5Config(vocab_size=len(tok), d_model=16, d_ff=32, d_kv=8, num_heads=2,
                                                    num_layers=2, num_decoder_layers=2, pad_token_id=0,
                                                    eos_token_id=0, decoder_start_token_id=0))
    model.save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    recipe = {"model": "t5", "task": {"kind": "pairs", "path": str(pairs)}, "output": "out",
              "modules": {"granularities": [2], "steps": 2, "batch_size": 4, "plans": ["e=2 d=2"],
                          "screen_limit": 4},
              "eval": {"split": "dev", "limit": 4}}
    df = run_recipe(load_recipe(recipe, base=tmp_path), progress=False)
    assert list(df.name) == ["original", "modules e=2 d=2"] and "dev_bleu" in df
    assert set(pd.read_csv(tmp_path / "out" / "screen.csv").plan) == {"e=11 d=11", "e=2 d=11", "e=11 d=2", "e=2 d=2"}
    assert "task.kind" in _err({**recipe, "task": {"kind": "text", "path": str(TEXT)}}, tmp_path)


def test_console_script_is_the_cli():
    import importlib
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["mtlab"].partition(":")
    assert getattr(importlib.import_module(module), attr) is main


def test_window_search_that_fits_nothing_is_refused_up_front(gpt2_example, tmp_path):
    msg = _err({**BASE, "output": str(tmp_path / "never"), "modules": None,
                "merge": {"window_search": {"sizes": [3], "starts": [2]}}}, gpt2_example)
    assert "merge.window_search: no window of sizes [3] starting at [2]" in msg and not (tmp_path / "never").exists()


def test_task_errors_are_recipe_errors(gpt2_example, tmp_path):
    few = tmp_path / "few.txt"
    few.write_text("just one line\n")
    msg = _err({**BASE, "task": {"kind": "text", "path": str(few)}}, gpt2_example)
    assert msg.startswith("task: ") and "few hundred lines" in msg


def test_the_schema_is_its_own_module_and_the_old_names_still_import():
    """The recipe's schema (pydantic, no torch) is `mtlab.recipe_schema`; the checks against the model
    `mtlab.recipe_load`; `mtlab.recipe` runs a recipe and still exports every name callers used."""
    code = ("import sys; from mtlab.recipe_schema import load_recipe; "
            "print('torch' in sys.modules, 'transformers' in sys.modules); "
            f"print(type(load_recipe({str(EXAMPLES / 'g2p_teacher' / 'recipe.yaml')!r})).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["False", "False", "Recipe"], out.stderr[-2000:]  # registries load when validating
    import mtlab.recipe as R
    import mtlab.recipe_load as RL
    import mtlab.recipe_schema as RS

    for name in ("Recipe", "RecipeError", "TaskSpec", "load_recipe"):
        assert getattr(R, name) is getattr(RS, name)
    for name in ("RecipeRunMismatch", "check_recipe", "check_output", "load_model_and_data", "load_model_and_task"):
        assert getattr(R, name) is getattr(RL, name)
    assert callable(R._train_cfg) and R.CONTROL and callable(R.run_recipe)
    for mod in (R, RL, RS):
        assert len(Path(mod.__file__).read_text().splitlines()) <= 400, mod.__name__
