"""The shipped module bank and baselines: exported with a card, loaded only when teacher, recipe and files match."""
import pytest

from mtlab.experiments import artifacts
from mtlab.experiments.artifacts import (bank_recipe, baseline_recipe, load_bank, load_baseline, train_bank,
                                         train_baseline)
from mtlab.shipped import ArtifactMismatch
from mtlab.tasks.diagnosis import score_splits
from mtlab.teacher import load_teacher


@pytest.fixture(scope="module")
def shipped_bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank")
    cfg = bank_recipe(steps=2, batch_size=4, granularities=(2,), eval_every=0)
    train_bank(cfg, out=root / "modules", work=root / "work", progress=False, ladder_words=4)
    return cfg, root / "modules"


def test_bank_card_records_budget_and_every_rung(shipped_bank):
    cfg, path = shipped_bank
    teacher, _ = load_teacher()
    bank, log = load_bank(cfg, teacher, path)
    card = log.attrs["card"]
    assert card["steps"] == 2 and card["examples_seen"] == 8 and card["command"] == "make modules"
    plans = {r["plan"] for r in card["ladders"]}
    assert "e=111111 d=111111" in plans and "e=222 d=222" in plans
    assert all({"test_per", "test_len_ratio", "test_eos_rate", "test_ins"} <= set(r) for r in card["ladders"])
    assert bank.granularities == {"encoder": (2,), "decoder": (2,)}


def test_bank_from_another_recipe_or_damaged_is_refused(shipped_bank, tmp_path):
    cfg, path = shipped_bank
    teacher, _ = load_teacher()
    with pytest.raises(ArtifactMismatch, match=r"replacing\.train\.steps.*make modules"):
        load_bank(bank_recipe(steps=3, batch_size=4, granularities=(2,), eval_every=0), teacher, path)
    import shutil

    copy = tmp_path / "modules"
    shutil.copytree(path, copy)
    f = copy / "bank" / "modules.safetensors"
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with pytest.raises(ArtifactMismatch, match="hash in its card"):
        load_bank(cfg, teacher, copy)
    with pytest.raises(ArtifactMismatch, match="does not exist.*make modules"):
        load_bank(cfg, teacher, tmp_path / "missing")


def test_baseline_ships_and_reloads_with_the_scores_of_its_card(tmp_path):
    cfg = baseline_recipe(steps=2, batch_size=4)
    train_baseline("sft-3", cfg, out_root=tmp_path / "b", work_root=tmp_path / "w", progress=False, words=4)
    (row,) = load_baseline("sft-3", cfg, tmp_path / "b")
    assert row.method == "sft" and row.budget.steps == 2 and row.label == "e=0,2,5 d=0,2,5"
    _, task = load_teacher()
    again = score_splits(row.model, task, limit=4)
    assert again["test_per"] == pytest.approx(row.scores["test_per"], abs=1e-3)
    with pytest.raises(ArtifactMismatch, match="train.lr"):
        load_baseline("sft-3", baseline_recipe(steps=2, batch_size=4, lr=1e-3), tmp_path / "b")
    with pytest.raises(ValueError, match="unknown baseline"):
        train_baseline("sft-9", cfg, out_root=tmp_path / "b", work_root=tmp_path / "w")


def test_a_baseline_not_shipped_is_an_empty_row_naming_the_fix(monkeypatch, tmp_path):
    from mtlab.experiments.modular import shipped_baselines
    from mtlab.profiles import get_profile

    monkeypatch.setattr(artifacts, "BASELINE_DIR", tmp_path)
    rows = shipped_baselines(get_profile("default").modular)
    assert len(rows) == 7 and all(r.model is None and "make baselines" in r.note for r in rows)


def test_a_table_made_before_a_baseline_shipped_is_not_reused(monkeypatch, tmp_path):
    from mtlab.experiments.modular import shipped_key
    from mtlab.profiles import get_profile

    p = get_profile("default").modular
    monkeypatch.setattr(artifacts, "BASELINE_DIR", tmp_path)
    before = shipped_key(p)
    assert set(before["shipped"]["baselines"].values()) == {"missing"} and len(before["shipped"]["bank"]["modules"]) == 64
    (tmp_path / "sft-3").mkdir()
    (tmp_path / "sft-3" / "card.json").write_text("{}")
    after = shipped_key(p)
    assert after != before and after["shipped"]["bank"] == before["shipped"]["bank"]
    assert "baselines" not in shipped_key(p, baselines=False)["shipped"] and shipped_key(get_profile("smoke").modular) == {}


@pytest.mark.parametrize("cmd, bad_name, message", [
    ("modules", None, None), ("ablation", None, None),
    ("baselines", "sft-9", "unknown baseline"),
    ("merges", "permute-9", "unknown merge candidate"),
    ("minilm", "sft-9", "unknown MiniLM artifact"),
])
def test_make_targets_parse(cmd, bad_name, message, capsys):
    """Every training command of the Makefile parses; an unknown --only name stops with a message."""
    from mtlab.cli import main

    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    if bad_name:
        with pytest.raises(SystemExit):
            main([cmd, "--only", bad_name])
        assert message in capsys.readouterr().err


def test_every_shipped_baseline_verifies_against_the_default_recipe():
    shipped = sorted(p.name for p in artifacts.BASELINE_DIR.iterdir() if (p / "card.json").exists()) \
        if artifacts.BASELINE_DIR.exists() else []
    for name in shipped:
        (cand, *more) = load_baseline(name, baseline_recipe())
        assert cand.provenance == "shipped" and cand.budget.steps == 20_000 and cand.model is not None
        assert {"test_wer", "test_per", "dev_wer", "dev_per"} <= set(cand.scores)
