"""The shipped FF-merge candidates (`make merges`): exported with a card, reloaded to the same model,
refused when teacher or recipe differ, and a row with a note in the merge table when not shipped."""
import shutil

import pandas as pd
import pytest
import torch

from mtlab.experiments import merge_artifacts as A
from mtlab.experiments import merge_training as T
from mtlab.experiments import merging as X
from mtlab.merging.build import check_ties
from mtlab.profiles import get_profile, replace
from mtlab.shipped import ArtifactMismatch, read_card
from mtlab.tasks.diagnosis import score_splits
from mtlab.teacher import load_teacher

SMOKE = get_profile("smoke")
# the smoke search (one window start, 32 dev words), combined candidates recovered 2 steps, shipped
TINY = replace(SMOKE, name="tiny-shipped", merging=replace(SMOKE.merging, recovery_steps=1, eval_limit=8,
                                                           combined_recovery_steps=2, shipped=True))
SHIPPED = ("permute-equal-ff", "layer_prune-equal-ff")  # one tied (save_merged), one plain (export)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    root = tmp_path_factory.mktemp("merges")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTLAB_CACHE", str(root / "cache"))
        search = X.teacher_window_search(TINY, progress=False)
        made = {n: T.train_merge(n, TINY, root / "merging", root / "runs", words=4, progress=False) for n in SHIPPED}
        T.train_control(TINY, root / "merging", root / "runs", words=4, progress=False)
        yield root, search, made


def _logits(model, task):
    batch = next(iter(task.iter_batches("dev", 4)))
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).logits


def test_ship_and_reload_give_the_same_model_and_scores(shipped):
    root, search, made = shipped
    _, task = load_teacher()
    cands = T.shippable(search)
    assert set(A.merge_names()) >= set(cands) >= set(SHIPPED)
    for name in SHIPPED:
        back = A.load_merge(cands[name], TINY.merging, root / "merging")
        assert back.provenance == "shipped" and back.budget.steps == 2 and back.label == cands[name].label
        assert torch.equal(_logits(back.model, task), _logits(made[name].model, task)), name
        assert sum(p.numel() for p in back.model.parameters()) == sum(p.numel() for p in made[name].model.parameters())
        again = score_splits(back.model, task, limit=4)
        assert again["test_per"] == pytest.approx(back.scores["test_per"], abs=1e-3), name
    check_ties(A.load_merge(cands["permute-equal-ff"], TINY.merging, root / "merging").model)
    card = read_card(root / "merging" / "permute-equal-ff")
    assert card["steps"] == 2 and card["examples_seen"] == 2 * TINY.merging.recovery_batch_size
    assert card["ff_removed"] == 4 and card["blocks_removed"] == 0 and card["command"] == "make merges"
    assert {"test_per", "test_wer", "dev_per", "dev_wer"} <= set(card["before"]) & set(card["after"])
    assert card["before"]["test_n"] == 4 and "rel_word_acc" in card["relative"]["after"]
    summary = A.shipped_summary(root / "merging")
    assert sorted(summary.name) == sorted([*SHIPPED, A.CONTROL_NAME]) and (summary.steps == 2).all()
    target = summary.attrs["target"]
    assert target["permute_keeps_99"] == (target["permute_rel_word_acc"] >= 0.99)
    assert "permute_beats_prune_at_equal_params" not in target  # layer pruning at equal params is not shipped here
    assert "save_merged" in card["format"] and "export" in read_card(root / "merging" / "layer_prune-equal-ff")["format"]


def test_a_rerun_resumes_from_the_finished_run_to_the_same_weights(shipped, monkeypatch):
    root, search, made = shipped
    monkeypatch.setenv("MTLAB_CACHE", str(root / "cache"))
    name = "permute-equal-ff"
    files = read_card(root / "merging" / name)["files"]
    assert T.train_merge(name, TINY, root / "merging", root / "runs", words=4, progress=False).provenance == "shipped"
    shutil.rmtree(root / "merging" / name)
    T.train_merge(name, TINY, root / "merging", root / "runs", words=4, progress=False)
    assert read_card(root / "merging" / name)["files"] == files  # same bf16 weights, byte for byte


def test_another_recipe_teacher_or_damaged_file_is_refused(shipped, tmp_path, monkeypatch):
    root, search, _ = shipped
    c = T.shippable(search)["permute-equal-ff"]
    with pytest.raises(ArtifactMismatch, match=r"recovery\.steps.*make merges"):
        A.load_merge(c, replace(TINY.merging, combined_recovery_steps=3), root / "merging")
    with pytest.raises(ArtifactMismatch, match=r"search\.select_limit"):
        A.load_merge(c, replace(TINY.merging, select_limit=33), root / "merging")
    copy = tmp_path / "merging"
    shutil.copytree(root / "merging", copy)
    f = copy / "permute-equal-ff" / "model" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ArtifactMismatch, match="hash in its card.*make merges"):
        A.load_merge(c, TINY.merging, copy)
    monkeypatch.setattr(A, "teacher_hash", lambda: "another")
    with pytest.raises(ArtifactMismatch, match="another teacher.*merges --only permute-equal-ff"):
        A.load_merge(c, TINY.merging, root / "merging")


def test_the_merge_table_reads_the_cards_and_notes_what_is_not_shipped(shipped, monkeypatch, capsys):
    root, _, _ = shipped
    monkeypatch.setenv("MTLAB_CACHE", str(root / "cache"))
    monkeypatch.setattr(A, "MERGE_DIR", root / "merging")
    t = X.teacher_merge_table(TINY, progress=False)
    combined = t[t.kind == "combined"]
    permute = combined[combined.method == "permute"]
    assert list(permute.recovery_steps) == [0, 2] and (permute.test_n == 4).all()  # the card's, full-split in real use
    vanilla = combined[combined.method == "vanilla"]
    assert list(vanilla.recovery_steps) == [0, 2] and vanilla.test_wer.iloc[0] >= 0
    assert vanilla.note.iloc[1] == A.NOT_SHIPPED and pd.isna(vanilla.test_wer.iloc[1])
    assert "make merges" in capsys.readouterr().out
    windows = t[t.kind == "window"]
    assert set(windows.recovery_steps) == {0, 1} and windows.note.isna().all()  # windows: cache recovery
    # a control per budget: the windows' (fine-tuned in the cache) and the combined rows' (read from its card),
    # each scored on the words of the rows it is the control of
    ctl = t[t.kind == "control"].set_index("recovery_steps")
    assert sorted(ctl.index) == [1, 2] and (ctl.method == X.CONTROL).all() and ctl.note.isna().all()
    assert ctl.at[2, "test_n"] == 4 and ctl.at[2, "test_wer"] == read_card(root / "merging" / A.CONTROL_NAME)["after"]["test_wer"]
    assert ctl.at[1, "test_n"] == windows.test_n.iloc[0]
    assert X.control_gaps(t)[(t.method == "permute") & (t.kind == "combined") & (t.recovery_steps == 2)].notna().all()


def test_smoke_reads_nothing_shipped():
    assert not SMOKE.merging.shipped and SMOKE.merging.combined_recovery_steps is None
    assert X.combined_recovery_config(SMOKE.merging) == X.recovery_config(SMOKE.merging)
    d = get_profile("default").merging
    assert d.shipped and X.combined_recovery_config(d).steps >= 1000 and X.combined_recovery_config(d).batch_size == 64


def test_the_conclusion_compares_each_size_at_its_own_longest_shared_budget():
    rows = [("original", "-", "-", 0.0, 0, 40.0, 11.0),
            ("permute", "encoder", "1-3", 0.09, 0, 45.0, 13.0), ("permute", "encoder", "1-3", 0.09, 50, 42.0, 12.0),
            ("layer_prune", "encoder", "1-3", 0.14, 0, 50.0, 14.0), ("layer_prune", "encoder", "1-3", 0.14, 50, 44.0, 12.5),
            ("permute", "encoder+decoder", "encoder:1-3 decoder:1-3", 0.19, 1000, 40.5, 11.2),
            ("vanilla", "encoder+decoder", "encoder:1-3 decoder:1-3", 0.19, 1000, None, None),  # not shipped
            ("layer_prune", "encoder+decoder", "encoder:1-3 decoder:1-3", 0.33, 1000, 48.0, 14.0)]
    t = pd.DataFrame(rows, columns=["method", "stack", "layers", "params_removed_frac", "recovery_steps", "test_wer",
                                    "test_per"]).assign(model="teacher", mean_cos=None, test_n=5836)
    text = X.conclusion(t)
    assert "encoder, 3 layers (after 50 recovery steps, 5,836 test words): **permute** wins with 42.0% WER" in text
    assert "encoder+decoder, 6 layers (after 1,000 recovery steps, 5,836 test words): **permute** wins with 40.5% WER" in text
    assert "after the longest recovery two methods share" in text and "vanilla" not in text


def test_the_frontier_takes_the_shipped_recovered_models(shipped, monkeypatch):
    from mtlab.experiments.explore import merge_rows

    root, search, made = shipped
    monkeypatch.setenv("MTLAB_CACHE", str(root / "cache"))
    monkeypatch.setattr(A, "MERGE_DIR", root / "merging")
    teacher, task = load_teacher()
    names = {f"{c.method} ({c.info['compare']})": name for name, c in T.shippable(search).items()}
    rows = {names[c.strategy]: c for c in merge_rows(TINY, teacher, task, progress=False)}
    assert set(rows) >= set(SHIPPED) | {"vanilla-equal-ff"}
    for name in SHIPPED:  # the very models `make merges` shipped, with their card's budget
        assert rows[name].provenance == "shipped" and rows[name].budget.steps == 2
        assert torch.equal(_logits(rows[name].model, task), _logits(made[name].model, task)), name
    assert rows["layer_prune-equal-ff"].method == "layer_prune" and rows["permute-equal-ff"].method == "merge"
    vanilla = rows["vanilla-equal-ff"]  # not shipped: recovered in the cache with the windows' budget
    assert vanilla.provenance == "cache" and vanilla.budget.steps == TINY.merging.recovery_steps
