"""mtlab.surgery on a tiny random T5: swaps always restore, drops copy, span_block picks the right block."""
from __future__ import annotations

import copy

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


def _generate_checked(model, ids):
    """Plain `generate()` (the cache transformers sizes from the config) must run and agree with
    generation on a cache that grows with the decoder (mtlab's own decoding)."""
    from mtlab.tasks.base import cache_kwargs

    with torch.no_grad():
        plain = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        ours = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, **cache_kwargs(model))
    assert torch.equal(plain, ours)


@pytest.mark.parametrize("change", ["drop encoder", "deepen decoder"])
def test_a_decoder_deeper_than_the_encoder_generates_in_memory_and_after_a_plain_reload(change, tmp_path):
    """transformers 5.x sizes the default KV cache from num_hidden_layers, the ENCODER's depth for
    T5: every depth change goes through set_stack_layers, which writes the decoder's depth where
    transformers reads it (issue 22, item 2)."""
    m = _t5()  # 3 + 2 layers
    if change == "drop encoder":
        small = surgery.drop_blocks(m, {"encoder": [1, 2]})  # 1 + 2
    else:
        small = _t5()
        surgery.replace_blocks(small, "decoder", [copy.deepcopy(b) for b in list(m.decoder.block) * 2])  # 3 + 4
    enc, dec = surgery.stack_depths(small).values()
    assert dec > enc
    assert small.config.get_text_config(decoder=True).num_hidden_layers == dec
    ids = torch.tensor([[3, 4, 5, 6, 1]])
    _generate_checked(small, ids)
    small.save_pretrained(tmp_path)
    again = T.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert surgery.stack_depths(again) == {"encoder": enc, "decoder": dec}
    _generate_checked(again, ids)


def _merged_t5(spec: str):
    from mtlab.merging.merge import merge_ffs

    torch.manual_seed(0)
    m = T.T5ForConditionalGeneration(T.T5Config(
        d_model=16, d_ff=32, num_layers=6, num_decoder_layers=2, num_heads=2, d_kv=8, vocab_size=32,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    return merge_ffs(m, [spec])


@pytest.mark.parametrize("spec,drop,record,tied", [
    ("encoder:3-4@first/vanilla", [1], ["encoder:2-3@first/vanilla"], (2, 3)),  # the set moves down
    ("encoder:3-5@middle/vanilla", [1, 2], ["encoder:1-3@middle/vanilla"], (1, 2, 3)),
    ("encoder:2-4@middle/vanilla", [3], ["encoder:2-3@2/vanilla"], (2, 3)),  # the anchor dropped: a survivor
    ("encoder:2-4@first/vanilla", [3, 4], [], None),  # one survivor: nothing left to tie
    ("encoder:1-2@first/vanilla", [4], ["encoder:1-2@first/vanilla"], (1, 2)),  # above the set: unchanged
])
def test_drop_blocks_renumbers_the_merge_record(spec, drop, record, tied, tmp_path):
    """Dropping blocks renumbers config.mtlab_merges, so load_merged re-ties the same layers
    (issue 22, item 3: the record kept the old numbers, tying the wrong layers after reload)."""
    from mtlab.merging.merge import load_merged, save_merged

    m = _merged_t5(spec)
    small = surgery.drop_blocks(m, {"encoder": drop})
    assert small.config.mtlab_merges == record
    blocks = small.encoder.block
    if tied:
        w = [blocks[i].layer[-1].DenseReluDense.wi.weight for i in tied]
        assert all(x is w[0] for x in w)
    ids, labels = torch.tensor([[3, 4, 5, 6, 1]]), torch.tensor([[2, 3, 1]])
    with torch.no_grad():
        ref = small(input_ids=ids, labels=labels).logits
        again = load_merged(save_merged(small, tmp_path / "m"))
        assert torch.equal(again(input_ids=ids, labels=labels).logits, ref)
    assert again.config.mtlab_merges == record


def test_replace_blocks_refuses_a_stack_with_recorded_merges():
    m = _merged_t5("encoder:0-1@first/vanilla")
    with pytest.raises(ValueError, match="assemble.*first, then merge"):
        surgery.replace_blocks(m, "encoder", list(m.encoder.block)[:3])
    surgery.replace_blocks(m, "decoder", list(m.decoder.block)[:1])  # another stack: fine
