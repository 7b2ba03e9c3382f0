"""The shared training loop: learning, resume identity, NaN stop, safe checkpoints."""
import pytest
import torch

from mtlab.checkpoint import CheckpointError, load_tensors
from mtlab.train import NonFiniteLossError, TrainConfig, cross_entropy_loss, train


def cfg(**kw):
    base = dict(steps=6, batch_size=16, lr=3e-3, warmup=2, log_every=2, ckpt_every=2, label_smoothing=0.1)
    return TrainConfig(**{**base, **kw})


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_loss_decreases_and_log_records_steps(g2p_task, tiny_t5, tmp_path):
    log = train(tiny_t5, g2p_task, cfg(steps=30, log_every=10, ckpt_every=30, lr=1e-2, warmup=5), tmp_path, progress=False)
    assert log.step.tolist() == [10, 20, 30]
    assert log.loss.iloc[-1] < log.loss.iloc[0]
    assert (tmp_path / "checkpoint" / "weights.safetensors").exists()


def test_interrupted_training_resumes_to_identical_weights(g2p_task, tmp_path):
    from mtlab.teacher import TeacherConfig, build_teacher

    def fresh():
        torch.manual_seed(0)
        return build_teacher(g2p_task.tokenizer, TeacherConfig(d_model=16, d_ff=32, num_heads=2, num_layers=1,
                                                               num_decoder_layers=1, dropout=0.2))

    straight = fresh()
    train(straight, g2p_task, cfg(), tmp_path / "a", progress=False)
    # max_seconds=0 stops after every step with a checkpoint; each call resumes where the last stopped
    resumed = fresh()
    for _ in range(10):
        log = train(fresh() if _ else resumed, g2p_task, cfg(), tmp_path / "b", max_seconds=0, progress=False)
        if len(log) and log.step.max() == 6:
            break
    final = fresh()
    from mtlab.checkpoint import load_training_state
    opt = torch.optim.AdamW(final.parameters())
    assert load_training_state(tmp_path / "b" / "checkpoint", final, list(final.parameters()), opt)["step"] == 6
    a, b = weights(straight), weights(final)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log.step.tolist() == [2, 4, 6]


def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(g2p_task, tiny_t5, tmp_path):
    ce = cross_entropy_loss()

    def poisoned(model, batch, step):
        loss, parts = ce(model, batch, step)
        return (loss * float("nan") if step == 3 else loss), parts

    with pytest.raises(NonFiniteLossError, match="loss is nan at step 3.*checkpoint"):
        train(tiny_t5, g2p_task, cfg(), tmp_path, loss_fn=poisoned, progress=False)
    tensors = load_tensors(tmp_path / "checkpoint" / "weights.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_truncated_checkpoint_is_refused_with_a_fix(g2p_task, tiny_t5, tmp_path):
    train(tiny_t5, g2p_task, cfg(steps=2), tmp_path, progress=False)
    f = tmp_path / "checkpoint" / "weights.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated.*re-create"):
        train(tiny_t5, g2p_task, cfg(steps=4), tmp_path, progress=False)


def test_no_trainable_parameters_is_an_error(g2p_task, tiny_t5, tmp_path):
    with pytest.raises(ValueError, match="nothing to train"):
        train(tiny_t5, g2p_task, cfg(), tmp_path, params=[], progress=False)
