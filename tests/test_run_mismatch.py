"""A run folder belongs to one model and one data set: a baseline run folder, a recovery folder and a
recipe's output made for one tiny model are refused for another model of the same shape (other
weights) or for other data, with RunMismatchError naming the field, instead of resuming the finished
run and handing back the FIRST model's weights; `mtlab run --check` names the same field; `fresh`
starts over. A run killed before its first checkpoint says that it restarts from step 0."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mtlab.train import RunMismatchError, TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tests" / "data" / "text_small.txt"
HASH = r"'[0-9a-f]+'"


def cfg(**kw):
    return TrainConfig(**{**dict(steps=2, batch_size=8, lr=3e-3, warmup=1, log_every=1, ckpt_every=1), **kw})


def t5(task, seed: int, layers: int = 2):
    """A tiny T5 of the teacher's family: every seed gives the same shape, other weights."""
    from mtlab.teacher import TeacherConfig, build_teacher

    torch.manual_seed(seed)
    return build_teacher(task.tokenizer, TeacherConfig(d_model=16, d_ff=32, num_heads=2, num_layers=layers,
                                                       num_decoder_layers=layers, dropout=0.0))


def other_data(task, words: int = 500):
    """The same task with another training split (its first `words` words)."""
    other = copy.copy(task)
    other.__dict__.pop("_mtlab_data_hashes", None)
    src, tgt = task.splits["train"]
    other.splits = {**task.splits, "train": (src[:words], tgt[:words])}
    other._encoded = {}
    return other


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- baselines ------------------------------------------------------------------------------------

def test_a_baseline_run_folder_is_refused_for_another_model_or_data(g2p_task, tmp_path, monkeypatch):
    from mtlab.baselines import BaselineBudget, build_baselines

    monkeypatch.chdir(tmp_path)  # default_run_dir: runs/sft/<hash of the depths>
    budget = BaselineBudget(train=cfg(), depths=(1,), progress=False)
    a, b = t5(g2p_task, 0), t5(g2p_task, 1)
    [first] = build_baselines(a, g2p_task, budget, ["sft"])
    [run] = list((tmp_path / "runs" / "sft").iterdir())
    with pytest.raises(RunMismatchError, match=rf"(?s)another teacher.*teacher_hash: checkpoint {HASH}, now {HASH}"
                                               r".*fresh=True"):
        build_baselines(b, g2p_task, budget, ["sft"])
    with pytest.raises(RunMismatchError, match=rf"(?s)other data.*data_hash: checkpoint {HASH}, now {HASH}"):
        build_baselines(a, other_data(g2p_task), budget, ["sft"])
    # the checkpoint alone tells too: the student starts from the other model's layers
    tag = run / "baseline.json"
    saved = tag.read_text()
    tag.unlink()
    with pytest.raises(RunMismatchError, match=rf"model_hash: checkpoint {HASH}, now {HASH}"):
        build_baselines(b, g2p_task, budget, ["sft"])
    tag.write_text(saved)
    # the same model and data resume the finished run: the same weights, no training
    [again] = build_baselines(a, g2p_task, budget, ["sft"])
    assert same(weights(first.model), weights(again.model))
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert json.loads(saved)["teacher_hash"] and set(state["identity"]) == {"model_hash", "data_hash"}


def test_layerdrop_fresh_starts_over_for_the_other_model(g2p_task, tmp_path):
    from mtlab.baselines import layerdrop_finetune

    a, b = t5(g2p_task, 0), t5(g2p_task, 1)
    layerdrop_finetune(a, g2p_task, cfg(), None, tmp_path / "ld", progress=False)
    with pytest.raises(RunMismatchError, match="teacher_hash"):
        layerdrop_finetune(b, g2p_task, cfg(), None, tmp_path / "ld", progress=False)
    got, _ = layerdrop_finetune(b, g2p_task, cfg(), None, tmp_path / "ld", progress=False, fresh=True)
    straight, _ = layerdrop_finetune(b, g2p_task, cfg(), None, tmp_path / "straight", progress=False)
    assert same(weights(got), weights(straight))


# ---- recovery -------------------------------------------------------------------------------------

MERGE = ["encoder:0-1/vanilla"]


def test_a_recovery_folder_is_refused_for_another_model_or_data(g2p_task, tmp_path):
    from mtlab.merging.build import merge_model
    from mtlab.merging.recover import recover

    a, b = t5(g2p_task, 0), t5(g2p_task, 1)
    out = tmp_path / "rec"
    recover(merge_model(a, MERGE), g2p_task, cfg(), out, progress=False)
    ckpt = (out / "checkpoint" / "weights.safetensors").read_bytes()
    other = merge_model(b, MERGE)
    before = weights(other)
    with pytest.raises(RunMismatchError, match=rf"(?s)another model.*model_hash: checkpoint {HASH}, now {HASH}"
                                               r".*fresh=True"):
        recover(other, g2p_task, cfg(), out, progress=False)
    assert same(before, weights(other))  # nothing was loaded into it
    with pytest.raises(RunMismatchError, match=rf"data_hash: checkpoint {HASH}, now {HASH}"):
        recover(merge_model(a, MERGE), other_data(g2p_task), cfg(), out, progress=False)
    assert (out / "checkpoint" / "weights.safetensors").read_bytes() == ckpt
    # fresh=True: the other model's own run, as in an empty folder
    got, _ = recover(merge_model(b, MERGE), g2p_task, cfg(), out, progress=False, fresh=True)
    straight, _ = recover(merge_model(b, MERGE), g2p_task, cfg(), tmp_path / "straight", progress=False)
    assert same(weights(got), weights(straight))
    # the model a run left in memory continues it (its weights are the checkpoint's)
    log = recover(got, g2p_task, cfg(), out, progress=False)[1]
    assert log.step.max() == 2


def test_an_embedding_recovery_is_refused_for_another_original(tmp_path):
    from transformers import BertConfig, BertModel

    from mtlab import embedding as E
    from mtlab.baselines import drop_layers
    from mtlab.minilm import load_minilm
    from mtlab.tasks.sentences import SentencesTask

    task = SentencesTask(load_minilm()[1], limit={"train": 32, "dev": 8, "test": 8}, max_length=16)

    def bert(seed):
        torch.manual_seed(seed)
        return BertModel(BertConfig(vocab_size=task.tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)).eval()

    a, b = bert(0), bert(1)
    student = drop_layers(a, {"layers": [1]})
    E.recover_embeddings(copy.deepcopy(student), a, task, cfg(), tmp_path / "rec", eval_limit=8, progress=False)
    # the same student distilled from another original: its run is another one
    with pytest.raises(RunMismatchError, match=rf"meta\.teacher_hash: checkpoint {HASH}, now {HASH}"):
        E.recover_embeddings(copy.deepcopy(student), b, task, cfg(), tmp_path / "rec", eval_limit=8, progress=False)
    with pytest.raises(RunMismatchError, match="model_hash"):
        E.recover_embeddings(drop_layers(b, {"layers": [1]}), b, task, cfg(), tmp_path / "rec", eval_limit=8,
                             progress=False)


# ---- recipes --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from mtlab.experiments.your_model import tiny_causal_lm

    return tiny_causal_lm(tmp_path_factory.mktemp("lm") / "model", TEXT, steps=5, layers=4, width=32)


def _recipe(tmp_path: Path, model: Path, text: Path) -> Path:
    data = {"model": str(model), "task": {"kind": "text", "path": str(text), "block_size": 32},
            "output": str(tmp_path / "out"),
            "merge": {"sets": ["layers:1-2/vanilla"], "align_tokens": 200,
                      "recovery": {"steps": 3, "batch_size": 8, "lr": 1e-3}},
            "eval": {"split": "dev", "limit": 4}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _check(recipe: Path, capsys) -> tuple[int, str]:
    from mtlab.cli import main

    capsys.readouterr()
    rc = main(["run", str(recipe), "--check"])
    got = capsys.readouterr()
    return rc, got.out + got.err


def test_a_recipe_rerun_after_the_model_or_data_changed_is_refused(tiny_lm, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from mtlab.recipe import RecipeError, RecipeRunMismatch, run_recipe

    model, text = tmp_path / "model", tmp_path / "text.txt"
    shutil.copytree(tiny_lm, model)
    shutil.copy(TEXT, text)
    recipe = _recipe(tmp_path, model, text)
    first = run_recipe(recipe, progress=False)
    rc, said = _check(recipe, capsys)
    assert rc == 0 and f"{recipe}: valid" in said
    # the model folder now holds other weights of the same shape
    m = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.save_pretrained(model)
    with pytest.raises(RecipeRunMismatch, match=rf"(?s)model_hash: recorded {HASH}, now {HASH}.*--fresh"):
        run_recipe(recipe, progress=False)
    rc, said = _check(recipe, capsys)
    assert rc == 2 and "Traceback" not in said and "model_hash: recorded" in said and "--fresh" in said
    assert "data_hash" not in said
    assert issubclass(RecipeRunMismatch, RunMismatchError) and issubclass(RecipeRunMismatch, RecipeError)
    # fresh: a new run of the new model, not the old merged model
    again = run_recipe(recipe, progress=False, fresh=True)
    merged = lambda df: df[df.kind == "merge"].dev_ppl.iloc[0]  # noqa: E731
    assert merged(again) != merged(first)
    assert _check(recipe, capsys)[0] == 0
    # other data: the same, naming data_hash
    text.write_text("\n".join(text.read_text().splitlines()[::-1]) + "\n")
    rc, said = _check(recipe, capsys)
    assert rc == 2 and "data_hash: recorded" in said and "model_hash" not in said
    with pytest.raises(RecipeRunMismatch, match="data_hash"):
        run_recipe(recipe, progress=False)


def test_a_recipe_output_of_an_older_mtlab_is_refused_not_resumed(tiny_lm, tmp_path, capsys):
    from mtlab.recipe import RecipeRunMismatch, run_recipe

    recipe = _recipe(tmp_path, tiny_lm, TEXT)
    run_recipe(recipe, progress=False)
    (tmp_path / "out" / "run.json").unlink()  # what an output folder written before run.json looks like
    rc, said = _check(recipe, capsys)
    assert rc == 2 and "model_hash: recorded '(not recorded" in said
    with pytest.raises(RecipeRunMismatch, match="not recorded"):
        run_recipe(recipe, progress=False)


# ---- a run killed before its first checkpoint --------------------------------------------------------

def test_a_run_killed_before_its_first_checkpoint_says_it_restarts_from_zero(g2p_task, tmp_path, capsys):
    from mtlab.recipe import _train_cfg

    out = tmp_path / "run"
    out.mkdir()
    # what SIGKILL at step 3 of a run that checkpoints every 10 steps leaves: a log, no checkpoint
    (out / "log.csv").write_text("step,lr,loss,seconds\n1,0.001,5.0,0.1\n2,0.001,4.9,0.2\n3,0.001,4.8,0.3\n")
    log = train(t5(g2p_task, 0, layers=1), g2p_task, cfg(steps=4, ckpt_every=10), out, progress=False)
    said = capsys.readouterr().out
    assert "no checkpoint in" in said and "stopped at step 3/4 before its first checkpoint" in said
    assert "restarts from step 0" in said and log.step.tolist() == [1, 2, 3, 4]
    # a recipe's short runs checkpoint about every fifth of the run, not only at the end
    assert [_train_cfg(n, 8, 1e-3, 0).ckpt_every for n in (1, 4, 200, 499, 5000)] == [1, 1, 40, 100, 500]
