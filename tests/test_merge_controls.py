"""Controls in the bundled merge studies (issue 22, item 10): every recovered merge or prune is read against
the original fine-tuned the same way (same recovery config, steps, data), scored on the same words or
sentences. A recovered row without its control is flagged (conclusions) or refused (`check_controls`); the
shipped controls (data/merging/original-control, data/minilm/control) load only after their hash is verified."""
from __future__ import annotations

import copy
import shutil
from dataclasses import replace

import pandas as pd
import pytest
import torch

from mtlab.experiments import merge_artifacts as A
from mtlab.experiments import merge_training as T
from mtlab.experiments import merging as X
from mtlab.experiments import minilm as ML
from mtlab.experiments import minilm_artifacts as art
from mtlab.experiments import minilm_training
from mtlab.profiles import MiniLMProfile, get_profile
from mtlab.shipped import ArtifactMismatch, read_card
from mtlab.teacher import load_teacher

SMOKE = get_profile("smoke")
TINY = replace(SMOKE, name="tiny-control", merging=replace(SMOKE.merging, combined_recovery_steps=2, shipped=True))
M = MiniLMProfile(steps=2, batch_size=4, ratios=(2.0,), merge_targets=(0.10,), merge_methods=("permute",),
                  align_tokens=200, train_sentences=32, select_limit=8, eval_limit=16, max_length=24,
                  latency_seconds=0.01, latency_rounds=1, freeze_word_embeddings=True, shipped=True)


def _t5_table(with_control: bool = True) -> pd.DataFrame:
    """merge.csv rows: the original, permute and layer pruning before/after 50 steps, on 1,000 test words."""
    rows = [("original", 0, 41.9, 11.5), ("permute", 0, 45.0, 12.9), ("permute", 50, 41.4, 11.4),
            ("layer_prune", 0, 50.0, 14.0), ("layer_prune", 50, 43.0, 12.1)]
    if with_control:
        rows.append((X.CONTROL, 50, 40.8, 11.2))
    t = pd.DataFrame(rows, columns=["method", "recovery_steps", "test_wer", "test_per"])
    return t.assign(model="teacher", stack=["-", "decoder", "decoder", "decoder", "decoder", "-"][:len(t)],
                    layers=["-", "1-3", "1-3", "1-3", "1-3", "-"][:len(t)],
                    params_removed_frac=[0, .09, .09, .19, .19, 0][:len(t)], dev_n=300, test_n=1000, mean_cos=None)


def test_each_recovered_row_is_read_against_its_control():
    t = _t5_table()
    gaps = X.control_gaps(t)
    assert gaps[t.method.eq("permute") & t.recovery_steps.eq(50)].item() == pytest.approx(41.4 - 40.8)
    assert gaps[t.recovery_steps == 0].isna().all() and gaps[t.method == X.CONTROL].isna().all()
    assert X.missing_controls(t).empty and X.check_controls(t) is t
    text = X.conclusion(t)
    assert "permute after recovery: 41.4% WER, the original fine-tuned the same way: 40.8% (+0.6 points" in text
    assert "The control, the original fine-tuned with the same recovery config" in text
    # a control on other words (or after other steps) is no control for these rows
    for other in ({"test_n": 5836}, {"recovery_steps": 1000}, {"dev_n": 5839}):
        moved = t.copy()
        for k, v in other.items():
            moved.loc[moved.method == X.CONTROL, k] = v
        assert X.control_gaps(moved).isna().all(), other
        assert len(X.missing_controls(moved)) == 2, other


def test_a_recovered_row_without_its_control_is_flagged_and_refused():
    t = _t5_table(with_control=False)
    assert X.control_gaps(t).isna().all()
    assert set(X.missing_controls(t).method) == {"permute", "layer_prune"}
    text = X.conclusion(t)
    assert "**no control** on these words" in text and "2 recovered row(s) have no control" in text
    with pytest.raises(ValueError, match="without their control.*original fine-tuned with the same recovery"):
        X.check_controls(t, what="the merge table")


def test_fine_tuned_control_is_the_original_recovered_with_the_same_config(tiny_t5, g2p_task, tmp_path):
    from mtlab.merging.recover import recover
    from mtlab.train import TrainConfig

    cfg = TrainConfig(steps=2, batch_size=4, lr=3e-4, warmup=1, log_every=1, ckpt_every=2, seed=0)
    before = {k: v.clone() for k, v in tiny_t5.state_dict().items()}
    control, log = X.fine_tuned_control(tiny_t5, g2p_task, cfg, tmp_path / "control")
    assert int(log.step.max()) == 2 and not control.training
    assert all(torch.equal(before[k], v) for k, v in tiny_t5.state_dict().items())  # the original is untouched
    again, _ = recover(copy.deepcopy(tiny_t5).train().requires_grad_(True), g2p_task, cfg, tmp_path / "again",
                       progress=False, save=False)
    assert all(torch.allclose(a, b) for a, b in zip(control.state_dict().values(), again.state_dict().values()))
    assert any(not torch.equal(before[k], v) for k, v in control.state_dict().items())  # it was fine-tuned


@pytest.fixture(scope="module")
def t5_control(tmp_path_factory):
    root = tmp_path_factory.mktemp("control")
    made = T.train_control(TINY, root / "merging", root / "runs", words=4, progress=False)
    return root / "merging", made


def test_shipped_t5_control_loads_verified_and_refuses_a_tampered_file(t5_control, tmp_path, monkeypatch):
    root, made = t5_control
    card = read_card(root / A.CONTROL_NAME)
    assert card["steps"] == 2 and card["method"] == X.CONTROL and card["params_removed_frac"] == 0
    assert card["config"]["recovery"]["steps"] == X.combined_recovery_config(TINY.merging).steps
    assert card["after"]["test_n"] == card["teacher"]["test_n"] == 4  # the same words as the teacher's row
    assert "merges --only original-control" in (root / A.CONTROL_NAME / "README.md").read_text()
    back = A.load_control(TINY.merging, root)
    assert back.provenance == "shipped" and back.budget.steps == 2
    batch = next(iter(load_teacher()[1].iter_batches("dev", 4)))
    with torch.no_grad():
        a = back.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).logits
        b = made.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).logits
    assert torch.equal(a, b)  # the reload is exactly what was scored
    row = A.shipped_control(TINY.merging, root)
    assert row["recovery_steps"] == 2 and row["test_wer"] == card["after"]["test_wer"] and row["test_n"] == 4
    with pytest.raises(ArtifactMismatch, match=r"recovery\.steps.*merges --only original-control"):
        A.load_control(replace(TINY.merging, combined_recovery_steps=3), root)
    copy_root = tmp_path / "merging"
    shutil.copytree(root, copy_root)
    f = copy_root / A.CONTROL_NAME / "model" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ArtifactMismatch, match="hash in its card"):
        A.load_control(TINY.merging, copy_root)
    with pytest.raises(ArtifactMismatch, match="hash in its card"):
        A.shipped_control(TINY.merging, copy_root)  # the table refuses it too, never reads a damaged control
    assert A.shipped_control(TINY.merging, tmp_path / "nothing") is None  # not shipped yet: an empty row
    assert A.CONTROL_NAME in A.merge_names()
    monkeypatch.setattr(A, "teacher_hash", lambda: "another")
    with pytest.raises(ArtifactMismatch, match="another teacher"):
        A.load_control(TINY.merging, root)


def test_the_bundled_t5_control_verifies():
    """data/merging/original-control: the teacher fine-tuned 1,000 steps like the shipped combined candidates."""
    d = get_profile("default").merging
    if not (A.MERGE_DIR / A.CONTROL_NAME).exists():
        pytest.skip("data/merging/original-control is not shipped yet: python -m mtlab merges --only original-control")
    row = A.shipped_control(d)
    assert row["recovery_steps"] == X.combined_recovery_config(d).steps == 1000
    perm = read_card(A.MERGE_DIR / "permute-equal-ff")
    assert row["test_n"] == perm["after"]["test_n"] and row["dev_n"] == perm["after"]["dev_n"]  # the same words
    assert read_card(A.MERGE_DIR / A.CONTROL_NAME)["config"]["recovery"] == perm["config"]["recovery"]


@pytest.fixture(scope="module")
def minilm_control(tmp_path_factory):
    root, work = tmp_path_factory.mktemp("minilm"), tmp_path_factory.mktemp("runs")
    assert art.CONTROL_NAME in art.artifact_names(M)
    assert minilm_training.ship(art.CONTROL_NAME, M, root, work, progress=False)
    return root, work


def test_shipped_minilm_control_loads_verified_and_refuses_a_tampered_file(minilm_control, tmp_path):
    from mtlab.experiments.minilm import original, reference_embeddings, study_task, test_scores

    root, _ = minilm_control
    model, card = art.load_control(M, root)
    assert card["steps"] == 2 and card["config"]["minilm"]["steps"] == M.steps  # the merges' recovery recipe
    (row,) = card["rows"]
    assert row["method"] == ML.CONTROL and row["recovery_steps"] == 2 and row["params_removed_frac"] == 0
    task = study_task(M, original()[1])
    scores = test_scores(model, task, reference_embeddings(task))  # the same test sentences as every merge row
    assert scores["mean_cos"] == pytest.approx(row["mean_cos"], abs=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), original()[0].state_dict().values()))
    with pytest.raises(ArtifactMismatch, match=r"minilm\.finetune_lr.*python -m mtlab minilm --only control"):
        art.load_control(replace(M, finetune_lr=1e-3), root)
    shutil.copytree(root / art.CONTROL_NAME, tmp_path / art.CONTROL_NAME)
    f = tmp_path / art.CONTROL_NAME / "control.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ArtifactMismatch, match="hash in its card"):
        art.load_control(M, tmp_path)


def test_the_bundled_minilm_control_verifies():
    m = get_profile("default").minilm
    if art.missing(art.CONTROL_NAME, m):
        pytest.skip("data/minilm/control is not shipped yet: python -m mtlab minilm --only control")
    model, card = art.load_control(m)
    merge = read_card(art.MINILM_DIR / "merge-10")
    assert card["steps"] == merge["steps"] == 500 and card["batch_size"] == merge["batch_size"] == 32
    assert card["config"]["minilm"] == merge["config"]["minilm"] and card["config"]["corpus"] == merge["config"]["corpus"]


def _minilm_frontier(with_control: bool = True) -> pd.DataFrame:
    rows = [("original", 0.0, 0, 1.0), ("permute", 0.1, 0, 0.74), ("permute", 0.1, 500, 0.954),
            ("layer_prune", 0.1, 0, 0.93), ("layer_prune", 0.1, 500, 0.972)]
    if with_control:
        rows.append((ML.CONTROL, 0.0, 500, 0.991))
    f = pd.DataFrame(rows, columns=["method", "target", "recovery_steps", "mean_cos"])
    return f.assign(params_removed_frac=f.target, plan="p", layers=6, on_frontier=False, test_mean_cos=f.mean_cos)


def test_minilm_merge_table_and_conclusion_read_the_control():
    f = _minilm_frontier()
    view = ML.merge_view(f)
    assert list(view.method) == ["original", ML.CONTROL, "permute", "layer_prune"]
    gap = view.set_index("method").vs_control
    assert gap["permute"] == pytest.approx(0.954 - 0.991) and gap["layer_prune"] == pytest.approx(0.972 - 0.991)
    assert pd.isna(gap["original"]) and pd.isna(gap[ML.CONTROL])
    text = ML.minilm_conclusion(f)
    assert "the control, scores 0.991: the recovered merge is -0.037 and layer pruning -0.019 against it" in text
    bare = ML.minilm_conclusion(_minilm_frontier(with_control=False))
    assert "**no control**" in bare
    assert ML.merge_view(_minilm_frontier(with_control=False)).vs_control.isna().all()


def test_minilm_study_has_the_control_row_on_the_same_sentences(minilm_control, monkeypatch):
    """The study's merge table (shipped profile) gets the control from its card, scored on the test sentences
    every merge row is scored on; a control not shipped yet is a row with the note."""
    from mtlab.profiles import Profile

    root, _ = minilm_control
    monkeypatch.setenv("MTLAB_CACHE", str(root.parent / "cache"))
    monkeypatch.setattr(art, "MINILM_DIR", root)  # merge-10 is not shipped here: its rows carry the note
    t = ML.minilm_merge_study(Profile("control-test", minilm=M), progress=False)
    ctl = t[t.method == ML.CONTROL]
    assert len(ctl) == 1 and ctl.recovery_steps.item() == M.steps and ctl.stage.item() == "recovered"
    assert ctl.test_mean_cos.item() == pytest.approx(art.load_control(M, root)[1]["rows"][0]["mean_cos"])
    empty = root.parent / "empty-minilm"
    empty.mkdir(exist_ok=True)
    monkeypatch.setattr(art, "MINILM_DIR", empty)
    t = ML.minilm_merge_study(Profile("control-test", minilm=M), progress=False)
    assert t[t.method == ML.CONTROL].note.item() == art.NOT_SHIPPED
