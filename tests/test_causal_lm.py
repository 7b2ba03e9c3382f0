"""Decoder-only models end to end: the text task, module training, assembly, screening, merging with a
recovery fine-tune and perplexity, on tiny GPT-2 (Conv1D) and Llama (GLU) models built from configs."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers as T

from mtlab.explore import max_abs_diff, screen, screen_per_plan
from mtlab.candidate import apply
from mtlab.merging.build import check_ties
from mtlab.merging.recover import recover
from mtlab.merging.windows import window_search
from mtlab.modular import ReplacingConfig, assemble, train_modules
from mtlab.modular.replacing import Replacer, replacing_loss
from mtlab.modular.bank import ModuleBank
from mtlab.tasks import CausalLMTask, split_by_hash
from mtlab.tasks.base import Batch
from mtlab.tasks.causal_lm import word_tokenizer
from mtlab.train import TrainConfig

TEXT = Path(__file__).parent / "data" / "text_small.txt"
LINES = TEXT.read_text().splitlines()


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(LINES)


@pytest.fixture(scope="module")
def task(tok):
    return CausalLMTask.from_file(TEXT, tok, block_size=16)


def _gpt2(tok, n_layer=4):
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=n_layer, n_head=2, vocab_size=len(tok), n_positions=64,
                                          bos_token_id=0, eos_token_id=0, pad_token_id=0))


def _llama(tok, n_layer=4):
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=n_layer,
                                            num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok),
                                            max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                                            pad_token_id=0))


MODELS = {"gpt2": _gpt2, "llama": _llama}


# ---- the task ------------------------------------------------------------------------------

def test_split_by_hash_of_lines(task):
    for s, (lines, _) in task.splits.items():
        assert lines and all(split_by_hash(line) == s for line in lines)
    assert sum(len(task.splits[s][0]) for s in task.splits) == len(set(LINES))


def test_blocks_predict_every_token_once_and_are_shifted(task, tok):
    src, tgt = task.encoded("dev")
    assert all(len(a) == len(b) <= 16 for a, b in zip(src, tgt))
    for a, b in zip(src, tgt):
        assert a[1:] == b[:-1]  # the target is the input shifted by one
    stream = [tok.eos_token_id] + [t for line in task.splits["dev"][0] for t in
                                   tok.encode(line, add_special_tokens=False) + [tok.eos_token_id]]
    assert [t for b in tgt for t in b] == stream[1:]  # every token but the first, once, in order
    assert src[0][0] == tok.bos_token_id


def test_collate_masks_by_length_not_pad_id(task):
    b = task.collate("dev", [0, len(task.encoded("dev")[0]) - 1])
    lens = [len(task.encoded("dev")[0][i]) for i in b.index]
    assert b.attention_mask.sum(1).tolist() == lens
    assert (b.labels != -100).sum(1).tolist() == lens
    assert b.input_ids.shape == b.labels.shape


def test_line_mode(tok):
    t = CausalLMTask(LINES, tok, block_size=None, max_length=8)
    src, tgt = t.encoded("train")
    assert len(src) == len(t.splits["train"][0])
    assert all(len(s) <= 7 for s in src) and all(s[0] == tok.bos_token_id for s in src)
    first = tok.encode(t.splits["train"][0][0], add_special_tokens=False)
    assert tgt[0] == (first + [tok.eos_token_id])[:7]


def test_bad_input_is_named(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="no text file"):
        CausalLMTask.from_file(tmp_path / "missing.txt", tok)
    (tmp_path / "few.txt").write_text("one line\n\nanother\n")
    with pytest.raises(ValueError, match="few hundred lines"):
        CausalLMTask.from_file(tmp_path / "few.txt", tok)
    with pytest.raises(ValueError, match="block_size"):
        CausalLMTask(LINES, tok, block_size=0)
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        CausalLMTask(LINES, str(tmp_path / "nowhere"))


def test_tokenizer_from_a_folder(tmp_path, tok):
    tok.save_pretrained(tmp_path)
    t = CausalLMTask(LINES, str(tmp_path), block_size=16)
    assert t.encoded("dev") == CausalLMTask(LINES, tok, block_size=16).encoded("dev")


@pytest.mark.parametrize("family", MODELS)
def test_perplexity_is_exp_of_the_model_loss(task, tok, family):
    """Against Hugging Face's own LM loss (which shifts internally), window by window, unpadded."""
    model = MODELS[family](tok).eval()
    r = task.evaluate(model, "dev", batch_size=4, progress=False)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for a, b in zip(*task.encoded("dev")):
            window = torch.tensor([a + b[-1:]])
            nll += float(model(input_ids=window, labels=window).loss) * len(b)
            tokens += len(b)
    assert r["tokens"] == tokens and r["nll"] == pytest.approx(nll / tokens, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(r["nll"]))


# ---- module training, assembly, screening ----------------------------------------------------

def test_replacing_config_on_a_shallow_model_names_the_fix(task, tok, tmp_path):
    with pytest.raises(ValueError, match=r"\[6\] impossible for the 4-layer stack 'layers'.*granularities=\(2, 3, 4\)"):
        train_modules(_gpt2(tok), task, ReplacingConfig(), tmp_path)
    assert not (tmp_path / "bank").exists()
    with pytest.raises(ValueError, match="1-layer stack has no span"):
        ReplacingConfig(granularities=(2,)).granularities_for({"layers": 1})
    assert ReplacingConfig(granularities=(2, 4)).granularities_for({"layers": 4}) == (2, 4)


def _short(steps=6):
    return ReplacingConfig(granularities=(2, 4), train=TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup=2,
                                                                   log_every=3, ckpt_every=100))


@pytest.mark.parametrize("family", MODELS)
def test_modules_assemble_and_screen(task, tok, tmp_path, family):
    teacher = MODELS[family](tok)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    bank, log = train_modules(teacher, task, _short(), tmp_path, progress=False)
    assert int(log.step.max()) == 6 and log.loss.notna().all() and (log.modules_in > 0).all()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # the teacher is frozen
    assert (tmp_path / "bank" / "modules.safetensors").exists()
    assert ModuleBank.load(tmp_path / "bank", teacher).granularities == {"layers": (2, 4)}
    small = assemble(teacher, bank, "layers=22")
    assert small.config.num_hidden_layers == 2
    assert math.isfinite(task.evaluate(small, "dev", progress=False)["ppl"])
    fast = screen(teacher, bank, task, split="dev", limit=8, batch_size=4, progress=False)
    slow = screen_per_plan(teacher, bank, task, split="dev", limit=8, batch_size=4, progress=False)
    assert set(fast.plan) == {"layers=1111", "layers=112", "layers=211", "layers=22", "layers=4"}
    assert max_abs_diff(fast, slow) < 1e-5
    assert fast.attrs["block_evals"] < slow.attrs["block_evals"]
    # the screened nll of a plan is the perplexity task's nll of the assembled model
    one = screen(teacher, bank, task, ["layers=22"], split="dev", limit=None, batch_size=64, progress=False)
    assert math.log(task.evaluate(small, "dev", progress=False)["ppl"]) == pytest.approx(float(one.nll[0]), rel=1e-4)


def test_replacing_loss_refuses_misaligned_labels(task, tok):
    teacher = _gpt2(tok)
    model = Replacer(teacher, ModuleBank.build(teacher, (2,)))
    b = task.collate("train", [0, 1])
    loss_fn = replacing_loss(_short())
    loss, parts = loss_fn(model, b, 0)
    assert torch.isfinite(loss)
    hf = Batch(b.input_ids, b.attention_mask, torch.where(b.attention_mask.bool(), b.input_ids, -100), b.index)
    with pytest.raises(ValueError, match="labels equal the input ids"):
        loss_fn(model, hf, 0)
    pairs = Batch(b.input_ids, b.attention_mask, b.labels[:, :5], b.index)
    with pytest.raises(ValueError, match="CausalLMTask"):
        loss_fn(model, pairs, 0)


def test_screen_refuses_seq2seq_labels_on_a_decoder_only_model(task, tok):
    class Pairs:  # labels of another length than the inputs, as a pairs task would give
        def batches(self, split, bs, limit=None):
            return task.batches(split, bs, limit=limit)

        def collate(self, split, idx):
            b = task.collate(split, idx)
            return Batch(b.input_ids, b.attention_mask, b.labels[:, :3], b.index)

    with pytest.raises(ValueError, match="CausalLMTask"):
        screen(_gpt2(tok), None, Pairs(), ["layers=1111"], split="dev", limit=4, progress=False)


# ---- merging with a recovery fine-tune -----------------------------------------------------

@pytest.mark.parametrize("family", MODELS)
def test_merge_search_and_recovery(task, tok, tmp_path, family):
    model = MODELS[family](tok).eval()
    ws = window_search(model, task, "layers", sizes=(2,), starts=(1,), select_limit=8, align_tokens=500,
                       batch_size=8, methods=["permute"], progress=False)
    assert ws.attrs["config"]["metric"] == "ppl" and not ws.attrs["config"]["higher_is_better"]
    assert ws.ppl.notna().all() and set(ws.kind) == {"original", "merge", "prune"}
    spec = ws[ws.kind == "merge"].spec.iloc[0]
    cand = apply(model, spec, batches_fn=lambda: task.iter_batches("train", 8), max_tokens=500)
    before = task.evaluate(cand, "dev", progress=False)["nll"]
    cand, log = recover(cand.train(), task, TrainConfig(steps=8, batch_size=8, lr=3e-3, warmup=1, log_every=4),
                        tmp_path, progress=False)
    check_ties(cand)
    assert int(log.step.max()) == 8 and (tmp_path / "model").exists()
    assert task.evaluate(cand, "dev", progress=False)["nll"] < before  # the fine-tune trains the LM loss


def test_screen_refuses_an_encoder_only_model(task, tok):
    bert = T.BertForMaskedLM(T.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=32, vocab_size=len(tok)))
    with pytest.raises(ValueError, match="decoder-only LM"):
        screen(bert, None, task, ["layers=11"], split="dev", limit=4, progress=False)


def test_from_dataset_rows(tok):
    class Rows(list):
        column_names = ["text", "id"]

    rows = Rows({"text": line, "id": i} for i, line in enumerate(LINES))
    t = CausalLMTask.from_dataset(rows, tok, block_size=16)
    assert t.encoded("dev") == CausalLMTask(LINES, tok, block_size=16).encoded("dev")
    with pytest.raises(KeyError, match="text_field"):
        CausalLMTask.from_dataset(rows, tok, text_field="body")


def test_attention_distillation_on_a_decoder_only_model(task, tok, tmp_path):
    from dataclasses import replace

    bank, log = train_modules(_gpt2(tok), task, replace(_short(3), w_attn=0.5), tmp_path, progress=False)
    assert log.attn_kl.notna().all() and (log.attn_kl > 0).all()


def test_a_plain_tokenizer_object():
    class Chars:  # encode/decode and an EOS id, nothing else
        eos_token_id = 0

        def encode(self, text):
            return [1 + ord(c) % 95 for c in text]

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i - 1) for i in ids if i)

    t = CausalLMTask(LINES, Chars(), block_size=None)
    src, tgt = t.encoded("dev")
    line = t.splits["dev"][0][0]
    assert src[0] == Chars().encode(line) and tgt[0] == Chars().encode(line)[1:] + [0]
    assert t.pad_id == 0 and t.bos_id is None
