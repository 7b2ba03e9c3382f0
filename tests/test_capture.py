"""mtlab.capture: named hook points, padding masks, per-stack token counts, hook hygiene.

Tiny randomly initialised models of the registered families are reused from
test_anatomy (built once per session, eval mode).
"""
from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F

from mtlab import anatomy as A
from mtlab.capture import KINDS, BatchConsumer, Capture, capture, collect, point_names
from test_anatomy import _model, _t5

V = 64


def _s2s_batch(seed=0, extra_pad=0):
    """Two sources of different lengths (pad id 1), labels of lengths unlike the sources'."""
    g = torch.Generator().manual_seed(seed)
    src = [torch.randint(3, V, (n,), generator=g) for n in (6, 4)]
    tgt = [torch.randint(3, V, (n,), generator=g) for n in (3, 5)]
    ws, wt = 6 + extra_pad, 5 + extra_pad
    ids = torch.full((2, ws), 1)
    labels = torch.full((2, wt), -100)
    for i, (s, t) in enumerate(zip(src, tgt)):
        ids[i, : len(s)] = s
        labels[i, : len(t)] = t
    return {"input_ids": ids, "attention_mask": (ids != 1).long(), "labels": labels}


def _clm_batch(seed=0, extra_pad=0):
    b = _s2s_batch(seed, extra_pad)
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


def _pix_batch(seed=0):
    return {"pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))}


FAMILY_CASES = {  # test_anatomy case -> batch builder
    "t5": _s2s_batch, "t5-gated": _s2s_batch, "t5-encoder-only": _clm_batch, "bart": _s2s_batch,
    "bart-bare": _s2s_batch, "gpt2": _clm_batch, "bert": _clm_batch, "llama": _clm_batch, "vit": _pix_batch,
}


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_every_point_of_every_family(case):
    model = _model(case)
    an = A.anatomy(model)
    batch = FAMILY_CASES[case]()
    points = []
    for stack in an.stacks.values():
        for i, layer in enumerate(stack):
            points += [f"{stack.name}.{i}.{k}" for k in KINDS if k != "ff_gate" or layer.ff.gated]
    assert any(p.endswith("ff_gate") for p in points) == (case in ("t5-gated", "llama"))
    before = _hook_count(model)
    out = collect(model, [batch], points)
    assert _hook_count(model) == before
    n_enc = int(batch["attention_mask"].sum()) if "attention_mask" in batch else 2 * 5  # ViT: 4 patches + CLS
    n_dec = int((batch["labels"] != -100).sum()) if "labels" in batch else None
    for p in points:
        stack, i, kind = p.rsplit(".", 2)
        ff = an.stack(stack).layer(int(i)).ff
        d = A.out_features(ff.w_in) if kind in ("ff_pre", "ff_gate", "ff_act") else A.out_features(ff.w_out)
        n = n_dec if stack == "decoder" else n_enc
        assert out[p].shape == (n, d), p
        assert torch.isfinite(out[p]).all()
    # the points are what their names say: recompute the FF sublayer from its pieces
    for stack in an.stacks.values():
        ff = stack.layer(0).ff
        pre, act, y = (out[f"{stack.name}.0.{k}"] for k in ("ff_pre", "ff_act", "ff_out"))
        with torch.no_grad():
            torch.testing.assert_close(F.linear(act, A.weight_oi(ff.w_out), ff.w_out.bias), y, atol=1e-5, rtol=1e-5)
            if ff.gated:
                gate = out[f"{stack.name}.0.ff_gate"]
                torch.testing.assert_close(ff.act(gate) * pre, act, atol=1e-5, rtol=1e-5)
            else:
                torch.testing.assert_close(ff.act(pre), act, atol=1e-5, rtol=1e-5)


def test_point_names_and_errors():
    model = _model("t5")
    assert point_names(model, "ff_out") == ["encoder.0.ff_out", "encoder.1.ff_out",
                                            "decoder.0.ff_out", "decoder.1.ff_out", "decoder.2.ff_out"]
    assert point_names(model, "attn_out", stack="decoder")[-1] == "decoder.2.attn_out"
    for bad, err in [("encoder.0.mlp", "unknown kind"), ("encoder.ff_out", "<stack>"), ("encoder.x.ff_out", "integer"),
                     ("encoder.0.ff_gate", "not gated")]:
        with pytest.raises(ValueError, match=err):
            Capture(model, [bad])
    with pytest.raises(IndexError):
        Capture(model, ["encoder.5.ff_out"])
    with pytest.raises(KeyError, match="valid"):
        Capture(model, ["layers.0.ff_out"])


@pytest.mark.parametrize("case,make", [("t5", _s2s_batch), ("bart", _s2s_batch), ("gpt2", _clm_batch),
                                       ("bert", _clm_batch)])
def test_padding_is_excluded(case, make):
    """Appending pad positions (attention_mask 0, labels -100) changes nothing that is delivered."""
    model = _model(case)
    points = [p for k in ("ff_pre", "ff_out", "block_out") for p in point_names(model, k)]
    a = collect(model, [make(0)], points)
    b = collect(model, [make(0, extra_pad=3)], points)
    for p in points:
        assert a[p].shape == b[p].shape, p
        torch.testing.assert_close(a[p], b[p], atol=1e-5, rtol=1e-5)


def test_decoder_tokens_counted_from_labels_not_encoder():
    model = _model("t5")
    batches = [_s2s_batch(s) for s in range(3)]
    n_enc = sum(int(b["attention_mask"].sum()) for b in batches)
    n_dec = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert n_enc != n_dec
    sums = {}
    res = capture(model, batches, ["encoder.1.ff_out", "decoder.2.ff_out"],
                  lambda p, f: sums.__setitem__(p, sums.get(p, 0) + f.shape[0]), progress=False)
    assert res.tokens == {"encoder": n_enc, "decoder": n_dec} and res.batches == 3
    assert sums == {"encoder.1.ff_out": n_enc, "decoder.2.ff_out": n_dec}


def test_mtlab_batches_and_decoder_needs_labels(g2p_task, tiny_t5):
    batches = list(g2p_task.iter_batches("dev", 4, limit=8))
    res = capture(tiny_t5, batches, ["encoder.0.ff_pre", "decoder.1.ff_act"], lambda p, f: None, progress=False)
    assert res.tokens["encoder"] == sum(int(b.attention_mask.sum()) for b in batches)
    assert res.tokens["decoder"] == sum(int((b.labels != -100).sum()) for b in batches)
    assert tiny_t5.training  # training mode restored (the fixture's model is in train mode)
    no_labels = [{"input_ids": b.input_ids, "attention_mask": b.attention_mask} for b in batches]
    # encoder points alone: the forward stops after the last encoder block, no decoder inputs needed
    assert capture(tiny_t5, no_labels, ["encoder.1.block_out"], lambda p, f: None, progress=False).tokens
    before = _hook_count(tiny_t5)
    with pytest.raises(ValueError, match="labels"):
        capture(tiny_t5, no_labels, ["decoder.0.ff_out"], lambda p, f: None, progress=False)
    assert _hook_count(tiny_t5) == before


def test_hooks_removed_after_consumer_error():
    model = _model("gpt2")
    before = _hook_count(model)

    def boom(point, feats):
        raise RuntimeError("consumer failed")

    with pytest.raises(RuntimeError, match="consumer failed"):
        capture(model, [_clm_batch()], point_names(model, "ff_pre") + point_names(model, "block_out"), boom,
                progress=False)
    assert _hook_count(model) == before
    # and the model still runs normally
    capture(model, [_clm_batch()], ["layers.0.ff_pre"], lambda p, f: None, progress=False)
    assert _hook_count(model) == before


def test_max_tokens_truncates_exactly_and_aligned():
    model = _model("t5")
    batches = [_s2s_batch(s) for s in range(4)]
    points = ["encoder.0.ff_pre", "encoder.1.ff_out", "decoder.0.ff_pre"]
    full = collect(model, batches, points)
    part = collect(model, batches, points, max_tokens=13)
    for p in points:
        assert part[p].shape[0] == 13
        torch.testing.assert_close(part[p], full[p][:13])  # the first 13 valid tokens, row-major


def test_memory_is_bounded_by_one_batch():
    """A summing consumer keeps O(d) state; the capture itself keeps no features between batches."""
    model = _model("bert")
    refs: list[list[weakref.ref]] = []
    total = {"n": 0, "s": torch.zeros(32)}

    class Sum(BatchConsumer):
        def process(self, feats):
            refs.append([weakref.ref(f) for f in feats.values()])
            for f in feats.values():
                total["n"] += f.shape[0]
                total["s"] += f.sum(0)
            if len(refs) >= 3:  # features of two batches ago are gone already (freed by refcount)
                assert all(r() is None for r in refs[-3])

    cap = Capture(model, ["layers.0.ff_out", "layers.1.block_out"], [Sum()])
    res = cap.run((_clm_batch(s) for s in range(20)), progress=False)  # a generator: streamed
    assert all(r() is None for rs in refs for r in rs)
    assert res.batches == 20 and total["n"] == 2 * res.tokens["layers"]
    assert not cap._masks and not cap._base_masks and cap._active is None


def test_tied_modules_record_once_per_layer():
    """After a merge, layers may share one FF module: each layer's hook records only its own call."""
    torch.manual_seed(0)
    model = _t5().eval()
    enc = model.encoder.block
    enc[1].layer[-1].DenseReluDense = enc[0].layer[-1].DenseReluDense  # tie the FF sublayers
    batch = _s2s_batch()
    out = collect(model, [batch], ["encoder.0.ff_pre", "encoder.1.ff_pre"])
    n = int(batch["attention_mask"].sum())
    assert out["encoder.0.ff_pre"].shape[0] == n and out["encoder.1.ff_pre"].shape[0] == n
    assert not torch.allclose(out["encoder.0.ff_pre"], out["encoder.1.ff_pre"])  # different inputs
