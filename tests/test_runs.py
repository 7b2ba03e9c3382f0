"""Runs never mix: resuming another config's checkpoint is refused (listing the fields), fresh=True
starts over, train_modules never rewrites an old run's bank, and a failed start leaves nothing."""
import json

import pytest
import torch

from mtlab.train import RunMismatchError, TrainConfig, cross_entropy_loss, train


def cfg(**kw):
    return TrainConfig(**{**dict(steps=2, batch_size=8, lr=3e-3, warmup=1, log_every=1, ckpt_every=2), **kw})


def fresh_model(g2p_task, layers: int = 1):
    from mtlab.teacher import TeacherConfig, build_teacher

    torch.manual_seed(0)
    return build_teacher(g2p_task.tokenizer, TeacherConfig(d_model=16, d_ff=32, num_heads=2, num_layers=layers,
                                                           num_decoder_layers=layers, dropout=0.0))


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resuming_another_config_is_refused_and_fresh_starts_over(g2p_task, tmp_path):
    train(fresh_model(g2p_task), g2p_task, cfg(), tmp_path / "run", progress=False)
    ckpt = (tmp_path / "run" / "checkpoint" / "weights.safetensors").read_bytes()
    model = fresh_model(g2p_task)
    before = weights(model)
    with pytest.raises(RunMismatchError, match=r"(?s)train\.lr: checkpoint 0\.003, now 0\.001.*"
                                               r"train\.seed: checkpoint 0, now 1.*fresh=True"):
        train(model, g2p_task, cfg(lr=1e-3, seed=1), tmp_path / "run", progress=False)
    assert all(torch.equal(v, before[k]) for k, v in weights(model).items())  # nothing loaded
    assert (tmp_path / "run" / "checkpoint" / "weights.safetensors").read_bytes() == ckpt
    # bookkeeping fields may change: this resumes the finished run
    assert train(fresh_model(g2p_task), g2p_task, cfg(log_every=2), tmp_path / "run", progress=False).step.max() == 2
    # fresh=True: the old run is deleted, and the result is that of a new run in an empty folder
    new = fresh_model(g2p_task)
    log = train(new, g2p_task, cfg(lr=1e-3), tmp_path / "run", progress=False, fresh=True)
    straight = fresh_model(g2p_task)
    train(straight, g2p_task, cfg(lr=1e-3), tmp_path / "straight", progress=False)
    assert log.step.tolist() == [1, 2]
    assert all(torch.equal(v, weights(straight)[k]) for k, v in weights(new).items())


def test_meta_is_compared_too(g2p_task, tmp_path):
    train(fresh_model(g2p_task), g2p_task, cfg(), tmp_path, progress=False, meta={"recipe": {"w": 1.0}})
    with pytest.raises(RunMismatchError, match=r"meta\.recipe\.w: checkpoint 1\.0, now 2\.0"):
        train(fresh_model(g2p_task), g2p_task, cfg(), tmp_path, progress=False, meta={"recipe": {"w": 2.0}})


def test_train_modules_refuses_another_config_and_keeps_the_old_bank(g2p_task, tmp_path):
    from mtlab.modular import ModuleBank, ReplacingConfig, train_modules

    teacher = fresh_model(g2p_task, layers=2)
    old = ReplacingConfig(granularities=(2,), train=cfg())
    train_modules(teacher, g2p_task, old, tmp_path, progress=False)
    bank_json = (tmp_path / "bank" / "bank.json").read_bytes()
    modules = (tmp_path / "bank" / "modules.safetensors").read_bytes()
    new = ReplacingConfig(granularities=(2,), w_kd=0.5, train=cfg())
    with pytest.raises(RunMismatchError, match=r"replacing\.w_kd: checkpoint 1\.0, now 0\.5"):
        train_modules(teacher, g2p_task, new, tmp_path, progress=False)
    assert (tmp_path / "bank" / "bank.json").read_bytes() == bank_json
    assert (tmp_path / "bank" / "modules.safetensors").read_bytes() == modules
    # the same config resumes the finished run and leaves the bank as it was
    train_modules(teacher, g2p_task, old, tmp_path, progress=False)
    assert (tmp_path / "bank" / "bank.json").read_bytes() == bank_json
    # the bank alone (checkpoint deleted) also tells the runs apart
    import shutil

    shutil.rmtree(tmp_path / "checkpoint")
    with pytest.raises(RunMismatchError, match="w_kd"):
        train_modules(teacher, g2p_task, new, tmp_path, progress=False)
    bank, log = train_modules(teacher, g2p_task, new, tmp_path, progress=False, fresh=True)
    assert json.loads((tmp_path / "bank" / "bank.json").read_text())["config"]["w_kd"] == 0.5
    assert ModuleBank.load(tmp_path / "bank", teacher).state_dict().keys() == bank.state_dict().keys()


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(g2p_task, tmp_path):
    ce = cross_entropy_loss()

    def broken(model, batch, step):
        if step == 1:
            raise RuntimeError("boom")
        return ce(model, batch, step)

    with pytest.raises(RuntimeError, match="boom"):
        train(fresh_model(g2p_task), g2p_task, cfg(steps=4, ckpt_every=4), tmp_path / "new" / "run",
              loss_fn=broken, progress=False)
    assert not (tmp_path / "new").exists()  # nor the parent folder it created
    with pytest.raises(ValueError, match="nothing to train"):
        train(fresh_model(g2p_task), g2p_task, cfg(), tmp_path / "none", params=[], progress=False)
    assert not (tmp_path / "none").exists()
    # an existing folder is kept with what was in it; only the log this run started goes
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(RuntimeError, match="boom"):
        train(fresh_model(g2p_task), g2p_task, cfg(steps=4, ckpt_every=4), tmp_path / "mine", loss_fn=broken,
              progress=False)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    # a failure after a checkpoint keeps the run, to resume
    with pytest.raises(RuntimeError, match="boom"):
        train(fresh_model(g2p_task), g2p_task, cfg(steps=4, ckpt_every=1), tmp_path / "kept", loss_fn=broken,
              progress=False)
    assert (tmp_path / "kept" / "checkpoint" / "state.json").exists()


def test_a_bank_is_refused_for_another_teacher_of_the_same_shape(g2p_task, tmp_path):
    from mtlab.checkpoint import CheckpointError
    from mtlab.modular import ModuleBank, ReplacingConfig, train_modules

    teacher = fresh_model(g2p_task, layers=2)
    other = fresh_model(g2p_task, layers=2)
    with torch.no_grad():
        other.decoder.block[1].layer[0].SelfAttention.o.weight[0, 0] += 1e-3  # one weight differs
    ModuleBank.build(teacher, (2,)).save(tmp_path / "bank", teacher=teacher)
    assert ModuleBank.load(tmp_path / "bank", teacher).teacher_hash == json.loads(
        (tmp_path / "bank" / "bank.json").read_text())["teacher_hash"]
    with pytest.raises(CheckpointError, match="another teacher.*retrain"):
        ModuleBank.load(tmp_path / "bank", other)
    # a bank trained by train_modules records its teacher, and so does its checkpoint
    train_modules(teacher, g2p_task, ReplacingConfig(granularities=(2,), train=cfg()), tmp_path / "run",
                  progress=False)
    with pytest.raises(CheckpointError, match="another teacher"):
        ModuleBank.load(tmp_path / "run" / "bank", other)
    import shutil

    shutil.copytree(tmp_path / "run" / "bank", tmp_path / "bank_only" / "bank")
    with pytest.raises(RunMismatchError, match="teacher_hash"):  # the bank alone tells
        train_modules(other, g2p_task, ReplacingConfig(granularities=(2,), train=cfg()), tmp_path / "bank_only",
                      progress=False)
    shutil.rmtree(tmp_path / "run" / "bank")
    with pytest.raises(RunMismatchError, match="meta.teacher_hash"):  # and so does the checkpoint
        train_modules(other, g2p_task, ReplacingConfig(granularities=(2,), train=cfg()), tmp_path / "run",
                      progress=False)
