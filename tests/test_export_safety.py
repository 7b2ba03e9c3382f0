"""mtlab.export never loses a user's files: a non-empty target that is not an earlier mtlab export of
the same model class is refused naming overwrite=True; overwrite=True removes only the files an
earlier export listed in its record; an earlier export is replaced cleanly; a failure leaves the
target as it was and no half-written folder beside it. Tiny random models built from configs."""
from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from test_anatomy import CASES

import mtlab.export as E
from mtlab.export import EXPORT_RECORD, ExportError, ExportTargetError, export, read_export_record

torch.set_num_threads(1)


def _model(case: str = "gpt2", seed: int = 0):
    torch.manual_seed(seed)
    return CASES[case][0]().eval()


def _snapshot(folder) -> dict[str, bytes]:
    """Every file under `folder` (relative POSIX path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _user_folder(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "notes.md").write_text("my notes\n")
    (d / "runs").mkdir(exist_ok=True)
    (d / "runs" / "x").write_text("a run of mine\n")
    return {"notes.md": b"my notes\n", "runs/x": b"a run of mine\n"}


def _logits(model, ids=torch.tensor([[3, 4, 5, 6]])):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _siblings(tmp_path, keep=("out",)):
    """Anything export left next to the target (temporary or moved-aside folders)."""
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in keep)


def test_user_files_are_refused_naming_overwrite(tmp_path):
    """The README's call on a folder with a user's notes.md and runs/: refused, nothing touched."""
    mine = _user_folder(tmp_path / "out")
    with pytest.raises(ExportTargetError, match=r"overwrite=True") as err:
        export(_model(), tmp_path / "out")
    assert "notes.md" in str(err.value) and "not an earlier mtlab export" in str(err.value)
    assert _snapshot(tmp_path / "out") == mine and _siblings(tmp_path) == []


def test_a_copy_of_the_users_model_folder_is_never_replaced(tmp_path):
    """A model folder of the user's own (config.json, model.safetensors): refused, and with
    overwrite=True still refused, since the export would replace files mtlab did not write."""
    _model(seed=1).save_pretrained(tmp_path / "out")
    before = _snapshot(tmp_path / "out")
    assert "config.json" in before and "model.safetensors" in before
    with pytest.raises(ExportTargetError, match=r"overwrite=True"):
        export(_model(), tmp_path / "out")
    with pytest.raises(ExportTargetError, match=r"config\.json.*mtlab did not write"):
        export(_model(), tmp_path / "out", overwrite=True)
    assert _snapshot(tmp_path / "out") == before and _siblings(tmp_path) == []


def test_a_file_as_target_is_refused(tmp_path):
    (tmp_path / "out").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ExportTargetError, match="is a file"):
            export(_model(), tmp_path / "out", overwrite=overwrite)
    assert (tmp_path / "out").read_text() == "keep me"


def test_an_empty_folder_is_written(tmp_path):
    (tmp_path / "out").mkdir()
    d = export(_model(), tmp_path / "out")
    record = json.loads((d / EXPORT_RECORD).read_text())
    assert sorted(record["files"]) == sorted(f for f in _snapshot(d) if f != EXPORT_RECORD)
    assert _siblings(tmp_path) == []


def test_an_earlier_export_of_the_same_model_class_is_replaced_cleanly(tmp_path, tiny_t5, g2p_task):
    """No flag needed (a rerun); the record lists exactly the folder's files; the first export's
    files that the second does not write (its tokenizer) are gone; the folder reloads to the second."""
    first = export(tiny_t5, tmp_path / "out", task=g2p_task)
    with_tokenizer = set(_snapshot(first))
    torch.manual_seed(7)
    second_model = type(tiny_t5)(tiny_t5.config).eval()
    d = export(second_model, tmp_path / "out")  # no task: no tokenizer this time
    files = set(_snapshot(d))
    record = json.loads((d / EXPORT_RECORD).read_text())
    assert set(record["files"]) | {EXPORT_RECORD} == files
    assert with_tokenizer - files, "the first export's tokenizer files should have been removed"
    again = T.AutoModelForSeq2SeqLM.from_pretrained(d).eval()
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, decoder_input_ids=ids).logits,
                           second_model(input_ids=ids, decoder_input_ids=ids).logits)
    assert _siblings(tmp_path) == []


def test_an_export_of_another_model_class_needs_overwrite(tmp_path):
    export(_model("gpt2"), tmp_path / "out")
    before = _snapshot(tmp_path / "out")
    bart = _model("bart")
    with pytest.raises(ExportTargetError, match=r"GPT2LMHeadModel.*overwrite=True"):
        export(bart, tmp_path / "out")
    assert _snapshot(tmp_path / "out") == before
    d = export(bart, tmp_path / "out", overwrite=True)
    assert json.loads((d / EXPORT_RECORD).read_text())["model_class"] == "BartForConditionalGeneration"
    assert set(_snapshot(d)) == set(read_export_record(d)["files"]) | {EXPORT_RECORD}
    assert _siblings(tmp_path) == []


def test_overwrite_never_deletes_files_mtlab_did_not_write(tmp_path):
    """An earlier export with a user's files added to it: refused without the flag; with
    overwrite=True the user's files stay byte for byte, the earlier export's listed files are
    replaced, and the folder reloads to the new model."""
    export(_model(seed=0), tmp_path / "out")
    (tmp_path / "out" / "extra_from_old_export.json").write_text("{}")  # pretend the old export wrote it
    record = json.loads((tmp_path / "out" / EXPORT_RECORD).read_text())
    record["files"].append("extra_from_old_export.json")
    (tmp_path / "out" / EXPORT_RECORD).write_text(json.dumps(record))
    mine = _user_folder(tmp_path / "out")
    with pytest.raises(ExportTargetError, match=r"notes\.md.*overwrite=True"):
        export(_model(seed=1), tmp_path / "out")
    new = _model(seed=1)
    d = export(new, tmp_path / "out", overwrite=True)
    after = _snapshot(d)
    assert {k: after[k] for k in mine} == mine
    assert "extra_from_old_export.json" not in after  # listed by the earlier export: removed
    assert set(after) == set(read_export_record(d)["files"]) | {EXPORT_RECORD} | set(mine)
    assert torch.equal(_logits(T.AutoModelForCausalLM.from_pretrained(d).eval()), _logits(new))
    # re-exporting into this mixed folder still needs the flag, and still keeps the user's files
    with pytest.raises(ExportTargetError, match="overwrite=True"):
        export(new, d)
    export(_model(seed=2), d, overwrite=True)
    assert {k: _snapshot(d)[k] for k in mine} == mine and _siblings(tmp_path) == []


def test_overwrite_writes_beside_a_users_files(tmp_path):
    mine = _user_folder(tmp_path / "out")
    model = _model()
    d = export(model, tmp_path / "out", overwrite=True)
    after = _snapshot(d)
    assert {k: after[k] for k in mine} == mine and "config.json" in after
    assert torch.equal(_logits(T.AutoModelForCausalLM.from_pretrained(d).eval()), _logits(model))


def test_a_record_without_a_file_list_is_not_trusted(tmp_path):
    """A folder with an mtlab_export.json that lists no files (an older mtlab, or a hand-made one):
    refused; overwrite=True may not replace its config.json either, since nothing says mtlab wrote it."""
    export(_model(), tmp_path / "out")
    record = json.loads((tmp_path / "out" / EXPORT_RECORD).read_text())
    del record["files"]
    (tmp_path / "out" / EXPORT_RECORD).write_text(json.dumps(record))
    before = _snapshot(tmp_path / "out")
    with pytest.raises(ExportTargetError, match="does not list the files.*overwrite=True"):
        export(_model(), tmp_path / "out")
    with pytest.raises(ExportTargetError, match="config.json"):
        export(_model(), tmp_path / "out", overwrite=True)
    record["files"] = ["../elsewhere.txt"]  # paths outside the folder are never trusted
    (tmp_path / "out" / EXPORT_RECORD).write_text(json.dumps(record))
    assert read_export_record(tmp_path / "out")["files"] is None
    assert _snapshot(tmp_path / "out").keys() == before.keys()


@pytest.mark.parametrize("start", ["missing", "earlier export", "user files"])
def test_a_failure_mid_export_leaves_the_target_as_it_was(start, tmp_path, monkeypatch):
    """The reload check fails after the weights were written: the target is unchanged (missing,
    the earlier export byte for byte, or the user's files) and no temporary folder is left."""
    if start == "earlier export":
        export(_model(seed=0), tmp_path / "out")
    elif start == "user files":
        _user_folder(tmp_path / "out")
    before = _snapshot(tmp_path / "out") if (tmp_path / "out").exists() else None

    def broken(model, directory, **kw):
        assert (directory / "model.safetensors").is_file()  # half-way: weights written, not yet checked
        raise ExportError("simulated failure during the reload check")

    monkeypatch.setattr(E, "check_reload", broken)
    with pytest.raises(ExportError, match="simulated"):
        export(_model(seed=1), tmp_path / "out", overwrite=True)
    if before is None:
        assert not (tmp_path / "out").exists()
    else:
        assert _snapshot(tmp_path / "out") == before
    assert _siblings(tmp_path) == []


@pytest.mark.parametrize("earlier", [False, True])
def test_a_failure_while_putting_files_beside_the_users_rolls_back(earlier, tmp_path, monkeypatch):
    """overwrite=True into a folder with user files (and an earlier export): the export's files are
    renamed in one by one; a failure half-way puts the folder back as it was, byte for byte."""
    from pathlib import Path

    if earlier:
        export(_model(seed=0), tmp_path / "out")
    _user_folder(tmp_path / "out")
    before = _snapshot(tmp_path / "out")
    real = E.os.replace
    into = []

    def flaky(a, b):
        if Path(b).parent == tmp_path / "out":
            into.append(b)
            if len(into) == 2:  # the second file renamed into the target
                raise OSError("simulated disk failure")
        return real(a, b)

    monkeypatch.setattr(E.os, "replace", flaky)
    with pytest.raises(OSError, match="simulated"):
        export(_model(seed=1), tmp_path / "out", overwrite=True)
    monkeypatch.setattr(E.os, "replace", real)
    assert _snapshot(tmp_path / "out") == before and _siblings(tmp_path) == []
    model = _model(seed=1)
    export(model, tmp_path / "out", overwrite=True)  # and a retry completes it
    assert torch.equal(_logits(T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()), _logits(model))


def test_leftovers_of_a_killed_export_are_cleaned_but_lookalikes_are_kept(tmp_path):
    stale = tmp_path / ".out.mtlab-export-abc123"  # a temporary folder of a killed export
    stale.mkdir()
    (stale / ".mtlab-export-partial").touch()
    (stale / "model.safetensors").write_bytes(b"half")
    lookalike = tmp_path / ".out.mtlab-export-mine"  # same prefix, not marked by export: not ours
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("keep")
    export(_model(), tmp_path / "out")
    assert not stale.exists() and (lookalike / "keep.txt").read_text() == "keep"
