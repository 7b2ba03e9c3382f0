"""The bundled teacher: loads offline, matches its model card, refuses broken files clearly."""
import json
import shutil

import pytest

from mtlab.checkpoint import CheckpointError
from mtlab.teacher import DEV_SLICE, TEACHER_DIR, load_teacher, teacher_card


@pytest.fixture(scope="module")
def teacher():
    return load_teacher()


def test_bundled_teacher_has_the_promised_shape(teacher):
    model, task = teacher
    card = teacher_card()
    assert type(model).__name__ == "T5ForConditionalGeneration"
    assert model.config.num_layers == 6 and model.config.num_decoder_layers == 6
    assert 128 <= model.config.d_model <= 256 and model.config.feed_forward_proj == "relu"
    assert sum(p.numel() for p in model.parameters()) == card["parameters"]
    assert card["split_sizes"] == task.sizes()
    assert (TEACHER_DIR / "model.safetensors").stat().st_size < 16 * 2**20


def test_teacher_scores_within_half_a_point_of_its_card(teacher):
    model, task = teacher
    card = teacher_card()["dev_slice"]
    got = task.evaluate(model, "dev", limit=DEV_SLICE, progress=False)
    assert got["n"] == card["n"] == DEV_SLICE
    assert abs(got["per"] - card["per"]) <= 0.5 and abs(got["wer"] - card["wer"]) <= 0.5


@pytest.fixture
def teacher_copy(tmp_path):
    dst = tmp_path / "teacher"
    shutil.copytree(TEACHER_DIR, dst)
    return dst


def test_missing_teacher_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing.*make teacher"):
        load_teacher(tmp_path)


def test_truncated_weights_are_refused(teacher_copy):
    w = teacher_copy / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_teacher(teacher_copy)


def test_tokenizer_that_does_not_match_the_model_is_refused(teacher_copy):
    f = teacher_copy / "g2p_tokenizer.json"
    spec = json.loads(f.read_text())
    spec["phones"] = spec["phones"][:-3]
    f.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="does not belong to this model"):
        load_teacher(teacher_copy)


def test_missing_tokenizer_is_refused(teacher_copy):
    (teacher_copy / "g2p_tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_teacher(teacher_copy)


def test_weights_from_another_config_are_refused(teacher_copy):
    cfg = json.loads((teacher_copy / "config.json").read_text())
    cfg["d_ff"] = cfg["d_ff"] * 2
    (teacher_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not fit the config"):
        load_teacher(teacher_copy)


def test_a_teacher_built_with_a_deeper_decoder_generates_plainly(tmp_path):
    """build_teacher with more decoder than encoder layers: plain generate() in memory and after a plain
    save/reload (transformers sizes its cache from the encoder's depth unless told otherwise)."""
    import torch
    from transformers import T5ForConditionalGeneration

    from mtlab.tasks.g2p import G2PTokenizer
    from mtlab.teacher import TeacherConfig, build_teacher

    torch.manual_seed(0)
    model = build_teacher(G2PTokenizer(["AA", "B", "K"]), TeacherConfig(d_model=32, d_ff=64, num_heads=2, num_layers=2,
                                                        num_decoder_layers=4)).eval()
    ids = torch.tensor([[5, 6, 7, 1]])
    first = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    model.save_pretrained(tmp_path / "m")
    again = T5ForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(again.generate(input_ids=ids, max_new_tokens=5, do_sample=False), first)
