"""Shipped artifacts: written atomically with a card, refused when the teacher, the config or a file differs."""
import json

import pytest
import torch
from safetensors.torch import save_file

from mtlab.shipped import ArtifactMismatch, config_diff, verify, write_artifact


def _write(path, config, teacher="abc"):
    return write_artifact(path, lambda tmp: save_file({"w": torch.ones(3)}, str(tmp / "w.safetensors")),
                          {"teacher_hash": teacher, "config": config}, "# card\n")


def test_round_trip_and_card(tmp_path):
    d = _write(tmp_path / "a", {"lr": 1e-3, "steps": 10})
    card = verify(d, teacher_hash="abc", config={"lr": 1e-3, "steps": 10}, remake="make x")
    assert set(card["files"]) == {"w.safetensors"} and (d / "README.md").exists()


def test_refuses_another_teacher(tmp_path):
    d = _write(tmp_path / "a", {"steps": 10}, teacher="other")
    with pytest.raises(ArtifactMismatch, match="another teacher.*make x"):
        verify(d, teacher_hash="abc", config={"steps": 10}, remake="make x")


def test_refuses_another_config_and_names_the_fields(tmp_path):
    d = _write(tmp_path / "a", {"train": {"steps": 10, "lr": 1e-3}})
    with pytest.raises(ArtifactMismatch, match=r"train\.steps.*make x"):
        verify(d, teacher_hash="abc", config={"train": {"steps": 20, "lr": 1e-3}}, remake="make x")
    assert config_diff({"a": (1, 2), "b": 1}, {"a": [1, 2], "b": 2}) == ["b"]


def test_refuses_a_truncated_or_missing_file(tmp_path):
    d = _write(tmp_path / "a", {"steps": 10})
    f = d / "w.safetensors"
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(ArtifactMismatch, match="does not match the hash"):
        verify(d, teacher_hash="abc", config={"steps": 10}, remake="make x")
    f.unlink()
    with pytest.raises(ArtifactMismatch, match="missing"):
        verify(d, teacher_hash="abc", config={"steps": 10}, remake="make x")
    with pytest.raises(ArtifactMismatch, match="does not exist.*make x"):
        verify(tmp_path / "nowhere", teacher_hash="abc", config={}, remake="make x")


def test_a_failed_write_leaves_nothing(tmp_path):
    def boom(tmp):
        save_file({"w": torch.ones(1)}, str(tmp / "w.safetensors"))
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_artifact(tmp_path / "a", boom, {"teacher_hash": "abc", "config": {}}, "")
    assert not any(tmp_path.iterdir())


def test_card_without_weights_is_refused(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        write_artifact(tmp_path / "a", lambda tmp: None, {}, "")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "card.json").write_text(json.dumps({"teacher_hash": "abc", "config": {}}))
    with pytest.raises(ArtifactMismatch, match="lists no weights"):
        verify(tmp_path / "b", teacher_hash="abc", config={}, remake="make x")


def test_shipped_state_changes_when_an_artifact_is_shipped_or_replaced(tmp_path):
    from mtlab.shipped import shipped_state

    assert shipped_state(tmp_path / "none") == {} and shipped_state(tmp_path, ["a"]) == {"a": "missing"}
    _write(tmp_path / "a", {"steps": 10})
    first = shipped_state(tmp_path, ["a", "b"])
    assert first["b"] == "missing" and len(first["a"]) == 64 and shipped_state(tmp_path) == {"a": first["a"]}
    _write(tmp_path / "a", {"steps": 20})  # re-shipped with another config: another card
    assert shipped_state(tmp_path, ["a"])["a"] != first["a"]
