"""Modular Transformers on a sentence encoder (mtlab.modular.embedding_replacing), plain saving of
compressed encoders, encoder latency and the MiniLM study's pieces, on a tiny BERT from a config."""
from __future__ import annotations

import pytest
import torch

from mtlab.embedding import embed_split, embedding_scores, save_encoder
from mtlab.modular import Plan, assemble
from mtlab.modular.embedding_replacing import (EmbeddingReplacingConfig, embedding_replacing_loss,
                                               train_embedding_modules)
from mtlab.modular.replacing import Replacer
from mtlab.profiles import MiniLMProfile
from mtlab.train import TrainConfig

SENTENCES = [f"Sentence number {i} says that the {w} value is returned when the {v} is given." for i, (w, v) in
             enumerate((w, v) for w in ("default", "first", "last", "cached", "new", "old", "empty", "full")
                       for v in ("key", "name", "path", "file", "list", "string", "buffer", "module"))]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from mtlab.minilm import model_dir

    return AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)


@pytest.fixture(scope="module")
def task(tokenizer):
    from mtlab.tasks.sentences import SentencesTask

    return SentencesTask(tokenizer, sentences=SENTENCES, max_length=24)


def tiny_bert(tokenizer, layers: int = 6):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    return BertModel(cfg).eval()


def rcfg(steps: int = 3) -> EmbeddingReplacingConfig:
    return EmbeddingReplacingConfig(train=TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup=1, log_every=1,
                                                      ckpt_every=steps))


def same_embeddings(a, b, task, split="test") -> bool:
    return torch.allclose(embed_split(a, task, split), embed_split(b, task, split), atol=1e-5)


@pytest.fixture(scope="module")
def trained(tokenizer, task, tmp_path_factory):
    teacher = tiny_bert(tokenizer)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    out = tmp_path_factory.mktemp("modules")
    bank, log = train_embedding_modules(teacher, task, rcfg(), out, progress=False)
    return teacher, before, bank, log, out


def test_module_training_runs_and_only_modules_change(trained):
    teacher, before, bank, log, out = trained
    assert int(log.step.max()) == 3 and (out / "bank" / "modules.safetensors").exists()
    assert log[["loss", "emb_cos", "hidden_mse", "local_mse"]].notna().all().all()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items()), "the original must stay frozen"
    assert bank.granularities == {"layers": (2, 3, 6)} and len(bank.blocks) == 3 + 2 + 1
    fresh = type(bank).build(teacher, (2, 3, 6), "last")
    assert any(not torch.equal(a, b) for a, b in zip(bank.state_dict().values(), fresh.state_dict().values()))


def test_loss_is_finite_with_every_term(tokenizer, task):
    from mtlab.modular import ModuleBank

    teacher = tiny_bert(tokenizer)
    model = Replacer(teacher, ModuleBank.build(teacher, (2, 3, 6), "last"))
    batch = task.collate("train", list(range(6)))
    loss, parts = embedding_replacing_loss(rcfg(10))(model, batch, step=9)
    assert torch.isfinite(loss) and loss.requires_grad
    assert set(parts) >= {"emb_cos", "hidden_mse", "local_mse", "p", "modules_in"} and parts["modules_in"] >= 1
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_bad_loss_weights_are_refused():
    with pytest.raises(ValueError, match="loss weights"):
        embedding_replacing_loss(EmbeddingReplacingConfig(w_emb=0, w_hidden=0, w_local=0))
    with pytest.raises(ValueError, match="loss weights"):
        embedding_replacing_loss(EmbeddingReplacingConfig(w_hidden=-1))


def test_plan_of_original_layers_equals_the_original(trained, task):
    teacher, _, bank, _, _ = trained
    model = assemble(teacher, bank, Plan.teacher({"layers": 6}))
    assert torch.equal(embed_split(model, task, "test"), embed_split(teacher, task, "test"))


def test_six_module_assembly_is_a_plain_bert_that_reloads(trained, task, tmp_path):
    from transformers import AutoModel, BertModel

    teacher, _, bank, _, _ = trained
    model = assemble(teacher, bank, "layers=6")
    assert type(model) is BertModel and len(model.encoder.layer) == 1 and model.config.num_hidden_layers == 1
    assert not same_embeddings(model, teacher, task)
    back = AutoModel.from_pretrained(str(save_encoder(model, tmp_path / "m6", task)), local_files_only=True)
    assert type(back) is BertModel and back.config.num_hidden_layers == 1
    assert torch.equal(embed_split(back, task, "test"), embed_split(model, task, "test"))


def test_merged_encoder_reloads_with_the_same_embeddings(tokenizer, task, tmp_path):
    import json

    from transformers import AutoModel

    from mtlab.measure import count_params
    from mtlab.merging.merge import tie_ffs

    model = tiny_bert(tokenizer)
    with torch.no_grad():  # the FF sublayers differ, so a lost tie would change the embeddings
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    n_full = count_params(model)
    merged = tie_ffs(model, ["layers:2-4"])  # in place
    assert count_params(merged) < n_full
    path = save_encoder(merged, tmp_path / "merged", task)
    back = AutoModel.from_pretrained(str(path), local_files_only=True)
    assert count_params(back) == n_full  # the ties were written as plain copies
    assert torch.equal(embed_split(back, task, "test"), embed_split(merged, task, "test"))
    assert json.loads((path / "mtlab_export.json").read_text())["untied_merges"] == ["layers:2-4@first/permute"]
    assert (path / "tokenizer.json").exists() and not (tmp_path / "merged.tmp").exists()


def test_encoder_latency_times_every_model_on_the_same_inputs(tokenizer, task):
    from mtlab.experiments.minilm import latency_inputs
    from mtlab.measure import encoder_latency

    big, small = tiny_bert(tokenizer), tiny_bert(tokenizer, layers=2)
    inputs = latency_inputs(task, (1, 16))  # 16 > the test split: sentences are cycled
    assert inputs[16]["input_ids"].shape[0] == 16
    df = encoder_latency({"big": big, "small": small}, inputs, min_run_time=0.01, rounds=2)
    assert len(df) == 4 and set(df.batch_size) == {1, 16}
    assert (df[df.model == "big"].speedup_vs_first == 1.0).all() and (df.seconds > 0).all()
    with pytest.raises(ValueError, match="at least one model"):
        encoder_latency({}, inputs)


def test_study_ladder_and_baselines_share_one_budget(trained, tokenizer, task, tmp_path):
    from mtlab.experiments.minilm import baseline_rows, baseline_student, depth_for, finetune_config, ladder_rows

    teacher, _, bank, _, _ = trained
    teacher = teacher.requires_grad_(False)
    ref = embed_split(teacher, task, "test")
    ladder = ladder_rows(teacher, bank, task, ref, steps=3)
    assert [r["plan"] for r in ladder] == ["layers=111111", "layers=11112", "layers=1122", "layers=222",
                                           "layers=33", "layers=6"]
    assert ladder[0]["mean_cos"] == pytest.approx(1.0) and ladder[0]["params_removed_frac"] == 0
    m = MiniLMProfile(steps=2, batch_size=8, ratios=(1.5, 3.0), select_limit=None)
    rows = baseline_rows(teacher, task, m, ref, tmp_path, progress=False)
    assert [(r["method"], r["layers"], r["recovery_steps"]) for r in rows] == [
        (meth, d, s) for d in (4, 2) for meth in ("layer_drop", "sft") for s in (0, 2)]
    assert {r["train_steps"] for r in rows if r["recovery_steps"]} == {m.steps}
    assert [depth_for(r, 6) for r in (1.5, 2.0, 3.0)] == [4, 3, 2]
    again = baseline_student(teacher, task, "sft", [0, 5], finetune_config(m), tmp_path / "sft_0-5")
    reread = embedding_scores(ref, embed_split(again, task, "test"))  # read back with plain AutoModel
    assert rows[-1]["mean_cos"] == pytest.approx(reread["mean_cos"], abs=1e-5)
    with pytest.raises(ValueError, match="ratios are compressions"):
        depth_for(0.5, 6)
