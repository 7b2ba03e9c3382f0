"""mtlab.surgery on a tiny random T5: swaps always restore, drops copy, span_block picks the right block."""
from __future__ import annotations

import pytest
import torch
import transformers as T

from mtlab import surgery

torch.set_num_threads(1)


def _t5():
    torch.manual_seed(0)
    return T.T5ForConditionalGeneration(T.T5Config(
        d_model=16, d_ff=32, num_layers=3, num_decoder_layers=2, num_heads=2, d_kv=8, vocab_size=32,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()


def test_swapped_restores_the_original_modulelist_even_on_error():
    m = _t5()
    before = m.encoder.block
    blocks = list(before)
    with surgery.swapped(m, {"encoder": [blocks[2], blocks[0]]}):
        assert [id(b) for b in m.encoder.block] == [id(blocks[2]), id(blocks[0])]
        assert m.config.num_layers == 3  # transient: config untouched
    assert m.encoder.block is before
    with pytest.raises(RuntimeError, match="boom"):
        with surgery.swapped(m, {"encoder": blocks[:1], "decoder": list(m.decoder.block)[:1]}):
            raise RuntimeError("boom")
    assert m.encoder.block is before and len(m.decoder.block) == 2
    with pytest.raises(ValueError, match="at least one block"):
        with surgery.swapped(m, {"encoder": []}):
            pass
    with pytest.raises(KeyError, match="no stack 'layers'"):
        with surgery.Swapper(m)("layers", blocks):
            pass


def test_drop_blocks_copies_and_hands_over_position_bias():
    m = _t5()
    small = surgery.drop_blocks(m, {"encoder": [0]})
    assert surgery.stack_depths(small) == {"encoder": 2, "decoder": 2} and small.config.num_layers == 2
    assert surgery.stack_depths(m) == {"encoder": 3, "decoder": 2}
    assert small.encoder.block[0].layer[0].SelfAttention.has_relative_attention_bias
    with pytest.raises(ValueError, match="leave no layer"):
        surgery.drop_blocks(m, {"decoder": [0, 1]})


def test_span_block_and_tie_params():
    m = _t5()
    originals = surgery.stack_blocks(m)

    class Bank:
        def get(self, stack, k, j):
            return ("module", stack, k, j)

    assert surgery.span_block(originals, Bank(), "encoder", 1, 1) is originals["encoder"][1]
    assert surgery.span_block(originals, Bank(), "decoder", 2, 2) == ("module", "decoder", 2, 1)
    with pytest.raises(ValueError, match="no bank"):
        surgery.span_block(originals, None, "encoder", 0, 3)
    a, b = m.encoder.block[0].layer[1].DenseReluDense.wi, m.encoder.block[1].layer[1].DenseReluDense.wi
    surgery.tie_params(b, a)
    assert b.weight is a.weight
    with pytest.raises(TypeError):
        surgery.tie_params(m.encoder.block[0], a)
