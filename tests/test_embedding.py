"""mtlab.embedding: pooled sentence embeddings, scores against the original (mean cosine,
recall@10, Spearman of pairwise similarities), and recovery of a layer-dropped tiny BERT by
distilling the original's embeddings through mtlab's training loop."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertModel

from mtlab import embedding as E
from mtlab.baselines import drop_layers
from mtlab.tasks.sentences import SentencesTask
from mtlab.train import TrainConfig


@pytest.fixture(scope="module")
def task():
    from mtlab.minilm import load_minilm

    return SentencesTask(load_minilm()[1], limit={"train": 256, "dev": 32, "test": 48}, max_length=24)


@pytest.fixture(scope="module")
def original(task):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=task.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, initializer_range=0.2)
    return BertModel(cfg).eval()


def test_original_against_itself_scores_one(original, task):
    s = E.evaluate_embeddings(original, original, task, "test")
    assert s == {"split": "test", "n": 48, "mean_cos": pytest.approx(1.0), "recall_at_10": 1.0, "spearman": 1.0}


def test_embeddings_follow_the_split_order_and_mean_pooling(original, task):
    emb = E.embed_split(original, task, "dev", batch_size=5)
    assert emb.shape == (32, 32) and torch.allclose(emb.norm(dim=1), torch.ones(32), atol=1e-5)
    b = task.collate("dev", [3, 7])
    h = original(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
    manual = torch.stack([h[i, : int(b.attention_mask[i].sum())].mean(0) for i in range(2)])
    assert torch.allclose(emb[[3, 7]], torch.nn.functional.normalize(manual, dim=1), atol=1e-5)


def test_scores_see_damage_and_reject_mismatched_sets():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 8, generator=g)
    noisy = a + 0.5 * torch.randn(40, 8, generator=g)
    s = E.embedding_scores(a, noisy)
    assert 0.5 < s["mean_cos"] < 1 and 0 < s["recall_at_10"] < 1 and 0.3 < s["spearman"] < 1
    other = E.embedding_scores(a, torch.randn(40, 8, generator=g))
    assert other["spearman"] < 0.2 and other["mean_cos"] < 0.3
    with pytest.raises(ValueError, match="one shape"):
        E.embedding_scores(a, a[:10])


def test_recovery_of_a_layer_dropped_model_raises_mean_cosine(original, task, tmp_path):
    student = drop_layers(original, {"layers": [1, 2]})
    before = E.evaluate_embeddings(original, student, task, "test")
    cfg = TrainConfig(steps=40, batch_size=32, lr=3e-3, warmup=4, log_every=10, ckpt_every=20, eval_every=20)
    model, log = E.recover_embeddings(student, original, task, cfg, tmp_path / "rec", hidden_weight=0.5,
                                      eval_limit=32, progress=False)
    after = E.evaluate_embeddings(original, model, task, "test")
    assert after["mean_cos"] > before["mean_cos"] + 0.02
    assert {"emb_cos", "hidden_mse", "dev_mean_cos", "dev_spearman"} <= set(log.columns)
    assert log.step.iloc[-1] == 40 and (tmp_path / "rec" / "log.csv").exists()
    # the original is untouched (it is the teacher, not trained)
    assert E.evaluate_embeddings(original, original, task, "test")["mean_cos"] == pytest.approx(1.0)


def test_hidden_state_pairs_are_checked(original, task):
    loss_fn = E.distillation_loss(original, hidden_weight=1.0, layer_map={9: 4})
    b = task.collate("train", [0, 1])
    with pytest.raises(ValueError, match="layer_map pair 9: 4 is out of range"):
        loss_fn(copy.deepcopy(original), b, 0)
    with pytest.raises(ValueError, match="hidden_weight"):
        E.distillation_loss(original, hidden_weight=-1)
