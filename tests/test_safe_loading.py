"""mtlab never unpickles what it loads: a planted pickle whose loading would run code is refused
with a CheckpointError, and its code never runs."""
import os
import pickle
import shutil

import pytest
import torch

from mtlab.checkpoint import CheckpointError
from mtlab.teacher import TEACHER_DIR, load_teacher


class Planted:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path, marker, as_torch=False):
    if as_torch:
        torch.save({"weight": Planted(marker)}, path)  # what a malicious pytorch_model.bin looks like
    else:
        path.write_bytes(pickle.dumps(Planted(marker)))


@pytest.fixture
def teacher_dir(tmp_path):
    dst = tmp_path / "teacher"
    shutil.copytree(TEACHER_DIR, dst)
    return dst


@pytest.mark.parametrize("as_torch", [False, True])
def test_teacher_weights_that_are_a_pickle_are_refused(teacher_dir, tmp_path, as_torch):
    marker = tmp_path / "ran"
    plant(teacher_dir / "model.safetensors", marker, as_torch)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_teacher(teacher_dir)
    assert not marker.exists()


def test_a_pytorch_bin_beside_missing_safetensors_is_never_read(teacher_dir, tmp_path):
    marker = tmp_path / "ran"
    (teacher_dir / "model.safetensors").unlink()
    plant(teacher_dir / "pytorch_model.bin", marker, as_torch=True)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_teacher(teacher_dir)
    assert not marker.exists()


def test_module_bank_merged_model_and_training_state_refuse_pickles(tmp_path, g2p_task, tiny_t5):
    from mtlab.merging.merge import load_merged, merge_ffs, save_merged
    from mtlab.modular import ModuleBank
    from mtlab.train import TrainConfig, train

    marker = tmp_path / "ran"
    bank = ModuleBank.build(tiny_t5, (2,))
    bank.save(tmp_path / "bank")
    plant(tmp_path / "bank" / "modules.safetensors", marker)
    with pytest.raises(CheckpointError):
        ModuleBank.load(tmp_path / "bank", tiny_t5)

    save_merged(merge_ffs(tiny_t5, ["encoder:0-1/vanilla"]), tmp_path / "merged")
    for f in (tmp_path / "merged").glob("*.safetensors"):
        plant(f, marker, as_torch=True)
    with pytest.raises(CheckpointError):
        load_merged(tmp_path / "merged")

    train(tiny_t5, g2p_task, TrainConfig(steps=2, batch_size=8, warmup=1, ckpt_every=2), tmp_path / "run", progress=False)
    plant(tmp_path / "run" / "checkpoint" / "weights.safetensors", marker)
    with pytest.raises(CheckpointError):
        train(tiny_t5, g2p_task, TrainConfig(steps=4, batch_size=8, warmup=1, ckpt_every=2), tmp_path / "run",
              progress=False)
    assert not marker.exists()
