"""Controls (issue 22, item 10): wherever a merged model after recovery is compared with the original, the
original fine-tuned with the same recovery config on the same data is a row beside it, labelled
"original + same fine-tune (control)", so a reader can tell what the merge did from what the fine-tune did:
notebook 07's merge table (`mtlab.experiments.your_model.merge_and_recover`) and the recipe's results."""
from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import torch

from mtlab.experiments import your_model as ym
from mtlab.profiles import PROFILES, YourModelProfile, replace
from models import tiny_llama

TEXT = Path(__file__).parent / "data" / "text_small.txt"

PROFILE = replace(PROFILES["smoke"], your_model=YourModelProfile(
    demo_steps=2, granularities=(2,), steps=2, batch_size=4, cka_tokens=200, eval_limit=4, screen_limit=4,
    window_sizes=(2,), align_tokens=200, recovery_steps=3))


def _llama(tmp: Path) -> Path:
    """A 3-layer Llama (grouped-query attention) saved with a word-level tokenizer of the small text."""
    return tiny_llama(tmp, layers=3)


def test_merge_and_recover_has_the_fine_tuned_original_as_control(tmp_path):
    from mtlab.merging.recover import recover

    model, task, work = ym.load(_llama(tmp_path), TEXT, "text", PROFILE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = ym.merge_and_recover(model, task, tmp_path / "work", PROFILE)
    t = res.table
    assert list(t.model) == ["original", "merged", "merged", ym.CONTROL]
    assert ym.CONTROL == "original + same fine-tune (control)"
    control = t.iloc[-1]
    assert control.recovery_steps == t.iloc[2].recovery_steps == 3 and control.params == t.iloc[0].params
    assert t.attrs["config"]["control"] == ym.CONTROL and t.attrs["config"]["recovery"]["steps"] == 3
    # the original is left as it was (the control trains a copy)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the control row is the original fine-tuned exactly as the merge was recovered
    cfg = ym._train_config(3, PROFILE.your_model.batch_size, PROFILE.your_model.recovery_lr)
    again, _ = recover(copy.deepcopy(model).train().requires_grad_(True), task, cfg, tmp_path / "again",
                       progress=False, save=False)
    ppl = task.evaluate(again, "dev", limit=4, progress=False)["ppl"]
    assert control.dev_ppl == pytest.approx(ppl, rel=1e-4) and control.dev_ppl != pytest.approx(t.iloc[0].dev_ppl)
    # the conclusion reads the merge against the control, not against the original alone
    ladder = pd.DataFrame({"plan": ["layers=111"], "params": [t.iloc[0].params], "params_ratio": [1.0],
                           "stack_ratio": [1.0], "ideal_speedup": [1.0], "dev_ppl": [t.iloc[0].dev_ppl],
                           "dev_tokens": [100]})
    screened = pd.DataFrame({"plan": ["layers=111"], "on_frontier": [True]})
    exported = pd.DataFrame({"model": ["a"], "reload_with": ["LlamaForCausalLM"], "dev_ppl": [1.0],
                             "dev_ppl_reloaded": [1.0], "max_logit_diff": [0.0]})
    text = ym.conclusion(ladder, res, screened, exported, task)
    assert "the control" in text and f"{control.dev_ppl:.3g}" in text
    assert f"Against the control the merge costs {t.iloc[2].dev_ppl - control.dev_ppl:+.3g}" in text


def test_recipe_results_have_the_control_row(tmp_path):
    from mtlab.recipe import CONTROL, load_recipe, run_recipe

    _llama(tmp_path)
    recipe = {"model": "llama", "task": {"kind": "text", "path": str(TEXT), "block_size": 16}, "output": "out",
              "merge": {"sets": ["layers:1-2@middle/permute"], "align_tokens": 200,
                        "recovery": {"steps": 2, "batch_size": 8}},
              "eval": {"split": "dev", "limit": 8}}
    df = run_recipe(load_recipe(recipe, base=tmp_path), progress=False)
    assert list(df.name) == ["original", "merge layers:1-2@middle/permute", CONTROL]
    row = df.set_index("name").loc[CONTROL]
    assert row.kind == "control" and row.compression == 1.0 and "2 steps" in row.spec
    assert pd.isna(row.get("path")) and not (tmp_path / "out" / "models" / "original_same_fine-tune_control").exists()
    assert row.dev_ppl != pytest.approx(df.set_index("name").loc["original"].dev_ppl)
    on_disk = pd.read_csv(tmp_path / "out" / "results.csv")
    assert CONTROL in set(on_disk.name) and CONTROL in (tmp_path / "out" / "summary.html").read_text()
    # no recovery: nothing was fine-tuned, so there is no control
    no = {**recipe, "output": "out2", "merge": {**recipe["merge"], "recovery": {"steps": 0}}}
    assert CONTROL not in set(run_recipe(load_recipe(no, base=tmp_path), progress=False).name)
