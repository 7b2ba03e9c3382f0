"""The MiniLM study's shipped runs (mtlab.experiments.minilm_artifacts) and their compact weights
(mtlab.compact): shipped with a card, reloaded to the same embeddings and scores, refused when
the config differs, and a row with a note when not shipped yet. Tiny budgets, temporary dirs."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mtlab.compact import load_packed, pack_state, save_packed, unpack_state
from mtlab.experiments import minilm_artifacts as art
from mtlab.experiments import minilm_training
from mtlab.profiles import MiniLMProfile, Profile
from mtlab.shipped import ArtifactMismatch

M = MiniLMProfile(steps=2, batch_size=4, ratios=(2.0,), merge_targets=(0.10,), merge_methods=("permute",),
                  align_tokens=200, train_sentences=32, select_limit=8, eval_limit=16, max_length=24,
                  latency_seconds=0.01, latency_rounds=1, freeze_word_embeddings=True, shipped=True)


def test_compact_codec_stores_only_what_changed(tmp_path):
    torch.manual_seed(0)
    base = {"a": torch.randn(6, 5), "b": torch.randn(5)}
    tuned = base["a"] + 1e-3 * torch.randn(6, 5)
    state = {"x": tuned, "same": base["a"].clone(), "tied": tuned.clone(), "new": torch.randn(3, 3),
             "ids": torch.arange(4)}
    tensors, meta = pack_state(state, base)
    assert meta == {"x": "delta:a", "same": "same:a", "tied": "alias:x", "new": "bf16", "ids": "raw"}
    assert tensors["x::q"].dtype == torch.int8 and "same" not in tensors and "tied" not in tensors
    out = unpack_state(tensors, meta, base)
    assert torch.equal(out["same"], base["a"]) and torch.equal(out["tied"], out["x"])
    assert (out["x"] - tuned).norm() <= (tuned.to(torch.bfloat16).float() - tuned).norm()  # never worse than bf16
    assert torch.equal(out["ids"], state["ids"])
    save_packed(tmp_path / "w.safetensors", state, base)
    back = load_packed(tmp_path / "w.safetensors", base)
    assert all(torch.equal(back[k], out[k]) for k in out)
    with pytest.raises(KeyError, match="lacks"):
        load_packed(tmp_path / "w.safetensors", {"b": base["b"]})


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    root, work = tmp_path_factory.mktemp("minilm"), tmp_path_factory.mktemp("runs")
    assert art.artifact_names(M) == ["modules", "layer_drop-3", "sft-3", "merge-10", "control"]
    for name in art.artifact_names(M):
        assert minilm_training.ship(name, M, root, work, progress=False)
    return root, work


def test_student_reloads_to_the_embeddings_it_was_scored_with(shipped):
    from transformers import AutoModel

    from mtlab.embedding import embed_split
    from mtlab.experiments.minilm import original, reference_embeddings, study_task, test_scores

    root, work = shipped
    model, card = art.load_student("sft-3", M, root)
    assert card["steps"] == 2 and card["examples_seen"] == 8 and card["keep"] == [0, 2, 5]
    assert card["command"] == "python -m mtlab minilm --only sft-3" and card["teacher_hash"]
    task = study_task(M, original()[1])
    trained = AutoModel.from_pretrained(str(work / "sft-3" / "student"), local_files_only=True).eval()
    base = {k: v for k, v in original()[0].state_dict().items()}
    decoded = type(model)(model.config)
    decoded.load_state_dict(unpack_state(*pack_state(trained.state_dict(), base), base))
    got = embed_split(model, task, "test")
    assert torch.equal(got, embed_split(decoded.eval(), task, "test"))  # the reload is exactly what was scored
    assert torch.nn.functional.cosine_similarity(got, embed_split(trained, task, "test")).min() > 0.9999
    scores = test_scores(model, task, reference_embeddings(task))
    assert scores == pytest.approx({k: card["rows"][1][k] for k in scores}, abs=1e-6)
    assert (root / "sft-3" / "README.md").read_text().count("sim_spearman") == 1


def test_bank_and_merges_reload_with_the_scores_of_their_cards(shipped):
    from mtlab.experiments.minilm import ladder_rows, original, reference_embeddings, study_task

    root, _ = shipped
    model, tok = original()
    task = study_task(M, tok)
    bank, log = art.load_modules(M, root)
    again = ladder_rows(model, bank, task, reference_embeddings(task), M.steps)
    assert [r["mean_cos"] for r in again] == pytest.approx([r["mean_cos"] for r in log.attrs["card"]["rows"]],
                                                           abs=1e-6)
    rows, models = art.load_merges("merge-10", M, root)
    assert set(models) == {"permute", "prune"} and set(rows.stage) == {"original", "selected", "recovered"}
    assert (rows[rows.stage == "recovered"].recovery_steps == 2).all()
    size = sum(p.stat().st_size for p in root.rglob("*.safetensors") if p.parent.name != art.CONTROL_NAME)
    assert size < 40e6  # compact: a fp32 MiniLM alone is 90 MB
    assert (root / art.CONTROL_NAME / "control.safetensors").stat().st_size < 15e6  # the control: int8 deltas


def test_artifact_from_another_config_or_damaged_is_refused(shipped, tmp_path):
    import shutil

    root, _ = shipped
    with pytest.raises(ArtifactMismatch, match=r"minilm\.finetune_lr.*python -m mtlab minilm --only sft-3"):
        art.load_student("sft-3", replace(M, finetune_lr=1e-3), root)
    art.load_student("sft-3", replace(M, latency_rounds=5, shipped=False), root)  # timing fields change no weights
    shutil.copytree(root / "sft-3", tmp_path / "sft-3")
    f = tmp_path / "sft-3" / "weights.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ArtifactMismatch, match="hash in its card"):
        art.load_student("sft-3", M, tmp_path)
    with pytest.raises(ValueError, match="unknown MiniLM artifact"):
        minilm_training.ship("sft-9", M, tmp_path, tmp_path)


def test_report_reads_shipped_runs_and_notes_missing_ones(shipped, monkeypatch, tmp_path):
    from mtlab.experiments.minilm import minilm_conclusion, minilm_csv, minilm_frontier

    profile = Profile("shipped-test", minilm=M)
    monkeypatch.setattr(art, "MINILM_DIR", shipped[0])
    full = minilm_frontier(profile, progress=False)
    assert "note" not in full or full.note.isna().all()
    assert full.mean_cos.notna().all() and full.speedup_b64.notna().all()
    assert {"modules", "sft", "layer_drop", "permute", "layer_prune", "original (fine-tuned)"} <= set(full.method)
    ctl = full[full.method == "original (fine-tuned)"]  # the control: timed as the original, never on a frontier
    assert ctl.recovery_steps.tolist() == [M.steps] and not ctl.on_frontier_any.any()
    assert "the control, scores" in minilm_conclusion(full)
    empty = tmp_path / "none"
    empty.mkdir()
    monkeypatch.setattr(art, "MINILM_DIR", empty)
    part = minilm_frontier(profile, progress=False)  # a fresh cache key: the shipped set differs
    noted = part[part.note.notna()]
    assert set(noted.note) == {art.NOT_SHIPPED} and noted.mean_cos.isna().all()
    assert {"modules", "sft", "layer_drop", "permute", "prune"} <= set(noted.method.replace(
        {"layer_prune": "prune"}))
    assert part[part.method == "original"].mean_cos.iloc[0] == pytest.approx(1.0)
    assert list(minilm_csv(part).columns) == list(minilm_csv(full).columns)
    assert "Not shipped yet (make minilm" in minilm_conclusion(part)
