"""mtlab.experiments.minilm: permute vs vanilla merging vs layer pruning on all-MiniLM-L6-v2 at
equal parameters removed, before and after one recovery budget (smoke-sized)."""
from __future__ import annotations

import pytest

from mtlab.experiments.minilm import equal_removal_plan, minilm_ff_merging
from mtlab.minilm import load_minilm
from mtlab.tasks.sentences import SentencesTask
from mtlab.train import TrainConfig


@pytest.fixture(scope="module")
def loaded():
    return load_minilm()


def test_equal_removal_plan_of_minilm(loaded):
    plan = equal_removal_plan(loaded[0])
    assert plan.merge_size.tolist() == [3, 5] and plan.prune_size.tolist() == [2, 4]
    assert ((plan.merge_share - plan.target).abs() < 0.01).all()
    assert ((plan.prune_share - plan.target).abs() < 0.04).all()  # whole blocks: the closest count
    with pytest.raises(ValueError, match="lower the target"):
        equal_removal_plan(loaded[0], targets=(0.6,))
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        equal_removal_plan(loaded[0], targets=(10,))


def test_smoke_table(loaded, tmp_path):
    model, tok = loaded
    task = SentencesTask(tok, limit={"train": 48, "dev": 12, "test": 16}, max_length=24)
    rec = TrainConfig(steps=2, batch_size=8, lr=5e-5, warmup=1, log_every=1, ckpt_every=2)
    df = minilm_ff_merging(model, tok, task, targets=(0.10,), recovery=rec, align_tokens=200, select_limit=12,
                           out_dir=tmp_path, progress=False)
    assert df.method.tolist() == ["original"] + [m for m in ("permute", "vanilla", "prune") for _ in range(2)]
    orig = df.iloc[0]
    assert (orig.test_mean_cos, orig.test_recall_at_10, orig.test_spearman) == (pytest.approx(1.0), 1.0, 1.0)
    rows = df.iloc[1:]
    assert set(rows.stage) == {"selected", "recovered"}
    assert set(rows[rows.stage == "recovered"].recovery_steps) == {2}
    assert (rows[rows.method != "prune"].params_removed_frac.round(3) == 0.104).all()
    assert rows[rows.method == "prune"].spec.str.startswith("prune layers:").all()
    assert (rows[rows.stage == "selected"].test_mean_cos < 1).all()
    for m in ("permute", "vanilla", "prune"):  # one run per method, same budget, resumable from out_dir
        assert (tmp_path / f"0.10_{m}" / "log.csv").exists()
    assert df.attrs["config"]["recovery"]["steps"] == 2 and df.attrs["config"]["sentences"]["test"] == 16
