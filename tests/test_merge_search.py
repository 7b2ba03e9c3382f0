"""mtlab.merging.{windows,build,correlations,recover}: windows, merged / pruned candidates, the window search, recovery.

Tiny random models keep this fast: a 4+4-layer T5 of the teacher's family on the G2P task,
and a 3-layer BERT scored by a callable for the non-seq2seq path.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import transformers as T

from mtlab.anatomy import anatomy
from mtlab.merging.merge import load_merged, merge_ffs
from mtlab.candidate import apply
from mtlab.measure import count_params
from mtlab.merging.build import check_ties, merge_model, prune_model
from mtlab.merging.correlations import CorrelationCache
from mtlab.merging.recover import recover
from mtlab.merging.windows import final_eval, window_search, windows
from mtlab.merging.stats import merge_correlations
from mtlab.train import TrainConfig

COLUMNS = {"stack", "start", "size", "layers", "kind", "method", "anchor", "spec", "removed", "params",
           "params_removed", "ff_removed", "blocks_removed", "per", "wer", "best"}


@pytest.fixture
def t5_44(g2p_task):
    from mtlab.teacher import TeacherConfig, build_teacher

    torch.manual_seed(0)
    return build_teacher(g2p_task.tokenizer, TeacherConfig(d_model=16, d_ff=32, num_heads=2, num_layers=4,
                                                           num_decoder_layers=4, dropout=0.0)).eval()


def _align(task, n=4):
    return lambda: list(itertools.islice(task.iter_batches("train", 32, shuffle=True, seed=0), n))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _numel(params):
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def test_windows_enumerates_every_contiguous_window():
    assert windows(4) == [(0, 2), (1, 2), (2, 2), (0, 3), (1, 3), (0, 4)]
    assert windows(6, [3, 2]) == [(s, 2) for s in range(5)] + [(s, 3) for s in range(4)]
    for depth in range(2, 8):
        got = windows(depth)
        assert len(got) == len(set(got)) == depth * (depth - 1) // 2
    with pytest.raises(ValueError, match="2..4"):
        windows(4, [1, 2])
    with pytest.raises(ValueError, match="2..4"):
        windows(4, [5])
    with pytest.raises(ValueError, match="no window"):
        windows(1)


def test_merge_model_copies_ties_and_matches_direct_merge(g2p_task, t5_44):
    before = _state(t5_44)
    align = _align(g2p_task)
    merged = merge_model(t5_44, ["encoder:1-3@middle/permute", "decoder:0-1/vanilla"], align, max_tokens=400)
    # the original is untouched
    assert all(torch.equal(v, before[k]) for k, v in t5_44.state_dict().items())
    assert not getattr(t5_44.config, "mtlab_merges", None)
    check_ties(merged)
    ff = _numel(anatomy(t5_44).stack("encoder").layer(0).ff.params())
    assert count_params(t5_44) - count_params(merged) == 3 * ff  # 2 encoder + 1 decoder FF sublayers
    # same weights as merge_ffs with merge_correlations called directly on the same data
    ref = copy.deepcopy(t5_44)
    merge_ffs(ref, ["encoder:1-3@middle/permute", "decoder:0-1/vanilla"], correlations=lambda s: merge_correlations(
        ref, align, s.stack, list(s.layers), s.anchor_layer(), max_tokens=400, progress=False))
    a, b = merged.state_dict(), ref.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prune_model_keeps_the_first_block_of_the_window(t5_44):
    before = _state(t5_44)
    pruned = prune_model(t5_44, "encoder", 1, 3)
    assert all(torch.equal(v, before[k]) for k, v in t5_44.state_dict().items())
    enc, old = anatomy(pruned).stack("encoder"), anatomy(t5_44).stack("encoder")
    assert len(enc) == 2 and pruned.config.num_layers == 2 and len(anatomy(pruned).stack("decoder")) == 4
    for new_i, old_i in ((0, 0), (1, 1)):  # layers 2 and 3 dropped, window start 1 kept
        a, b = enc.layers[new_i].state_dict(), old.layers[old_i].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    block = _numel(old.layers[2].parameters())
    assert count_params(t5_44) - count_params(pruned) == 2 * block
    assert str(apply(t5_44, "prune encoder:1-3").config.num_layers) == "2"
    with pytest.raises(ValueError, match="does not fit"):
        prune_model(t5_44, "encoder", 3, 2)
    with pytest.raises(ValueError, match="prune STACK:START-END"):
        apply(t5_44, "prune encoder:1")


def test_window_search_columns_splits_params_and_best(g2p_task, t5_44, monkeypatch):
    seen = []
    for name in ("evaluate", "predict", "batches", "texts"):
        orig = getattr(g2p_task, name)

        def spy(split, *a, _orig=orig, **kw):
            seen.append(split)
            return _orig(split, *a, **kw)

        def spy_model(model, split, *a, _orig=orig, **kw):
            seen.append(split)
            return _orig(model, split, *a, **kw)

        monkeypatch.setattr(g2p_task, name, spy_model if name in ("evaluate", "predict") else spy)
    before = _state(t5_44)
    df = window_search(t5_44, g2p_task, stack=None, sizes=(2, 3), starts=[1], select_limit=8, align_tokens=300,
                       progress=False)
    assert "test" not in seen and {"train", "dev"} <= set(seen)
    assert all(torch.equal(v, before[k]) for k, v in t5_44.state_dict().items())
    assert COLUMNS <= set(df.columns)
    cfg = df.attrs["config"]
    assert cfg["align_split"] == "train" and cfg["select_split"] == "dev" and cfg["metric"] == "per"
    assert cfg["higher_is_better"] is False and cfg["alignment_tokens_used"]
    rows = df[df.kind != "original"]
    # one row per (stack, start, size, method): 2 stacks x windows (1,2), (1,3) x permute/vanilla/prune
    assert len(rows) == 12 and not rows.duplicated(["stack", "start", "size", "method"]).any()
    assert set(rows.kind) == {"merge", "prune"} and set(rows.method) == {"permute", "vanilla", "prune"}
    assert (df.kind == "original").sum() == 1 and not df[df.kind == "original"].best.any()
    n0 = count_params(t5_44)
    an = anatomy(t5_44)
    for _, r in rows.iterrows():
        st = an.stack(r.stack)
        k = r["size"]
        assert r.ff_removed == k - 1 and r.params_removed == n0 - r.params
        if r.kind == "merge":
            assert r.params_removed == (k - 1) * _numel(st.layer(0).ff.params()) and r.blocks_removed == 0
            assert r.spec == f"{r.stack}:{r.layers}@middle/{r.method}"
        else:
            assert r.params_removed == (k - 1) * _numel(st.layers[1].parameters())
            assert r.spec == f"prune {r.stack}:{r.start}-{r.start + k - 1}"
            # pruning removes more parameters than merging at equal k
            assert r.params_removed > rows[(rows.kind == "merge") & (rows["stack"] == r["stack"])
                                           & (rows["size"] == k)].params_removed.max()
        assert count_params(apply(t5_44, r.spec, batches_fn=_align(g2p_task))) == r.params
    for _, g in rows.groupby(["stack", "size", "method"]):
        assert g.best.sum() == 1 and g[g.best].per.iloc[0] == g.per.min()


def test_window_search_refuses_the_test_split(g2p_task, t5_44):
    with pytest.raises(ValueError, match="test split"):
        window_search(t5_44, g2p_task, select_split="test", progress=False)
    with pytest.raises(ValueError, match="test split"):
        window_search(t5_44, g2p_task, align_split="test", progress=False)


def test_final_eval_scores_the_test_split(g2p_task, t5_44):
    df = final_eval({"original": t5_44, "pruned": prune_model(t5_44, "decoder", 0, 2)}, g2p_task, limit=4,
                    progress=False)
    assert df.name.tolist() == ["original", "pruned"] and set(df.split) == {"test"}
    assert {"per", "wer", "params"} <= set(df.columns) and df.params[1] < df.params[0]


def tiny_bert_and_batches():
    """A 3-layer random BertModel and three batches of random token ids (encoder-only window searches)."""
    torch.manual_seed(0)
    bert = T.BertModel(T.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                    vocab_size=50, max_position_embeddings=32)).eval()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 50, (8, 12), generator=g),
             "attention_mask": torch.ones(8, 12, dtype=torch.long)} for _ in range(3)]
    return bert, data


def test_window_search_with_a_score_function_on_an_encoder_only_model():
    bert, data = tiny_bert_and_batches()
    probe = data[0]
    with torch.no_grad():
        ref = bert(**probe).last_hidden_state

    def score(m):
        with torch.no_grad():
            out = m(**probe).last_hidden_state
        return {"cos": torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean().item(), "label": "x"}

    with pytest.raises(ValueError, match="higher_is_better"):
        window_search(bert, score_fn=score, align_batches=lambda: data, progress=False)
    df = window_search(bert, score_fn=score, align_batches=lambda: data, higher_is_better=True, sizes=None,
                       align_tokens=200, progress=False)
    assert df.attrs["config"]["metric"] == "cos" and "label" not in df.columns
    assert df.cos[df.kind == "original"].iloc[0] == pytest.approx(1.0)
    rows = df[df.kind != "original"]
    assert sorted(set(zip(rows.start, rows["size"]))) == [(0, 2), (0, 3), (1, 2)]
    for _, g in rows.groupby(["size", "method"]):
        assert g.best.sum() == 1 and g[g.best].cos.iloc[0] == g.cos.max()


def test_correlation_cache_computes_each_pair_once(g2p_task, t5_44):
    calls = []
    align = _align(g2p_task, 2)

    def counted():
        calls.append(1)
        return align()

    cache = CorrelationCache(t5_44, counted, max_tokens=200)
    merge_model(t5_44, ["encoder:0-2@middle"], cache=cache)
    merge_model(t5_44, ["encoder:1-2@first"], cache=cache)   # pair (anchor 1, layer 2) again
    assert len(calls) == 1 and len(cache) == 2
    merge_model(t5_44, ["encoder:1-3@first"], cache=cache)   # only (1, 3) is new
    assert len(calls) == 2 and len(cache) == 3
    with pytest.raises(TypeError, match="fresh batches"):
        CorrelationCache(t5_44, iter(align()))


def test_recover_keeps_ties_learns_and_resumes(g2p_task, t5_44, tmp_path):
    merged = merge_model(t5_44, ["encoder:0-2@middle/vanilla", "decoder:1-2/vanilla"])
    n = count_params(merged)
    cfg = TrainConfig(steps=20, batch_size=16, lr=1e-2, warmup=2, log_every=10, ckpt_every=10)
    model, log = recover(merged, g2p_task, cfg, tmp_path, progress=False)
    assert model is merged and not model.training
    check_ties(model)
    assert count_params(model) == n
    assert log.step.tolist() == [10, 20] and log.loss.iloc[-1] < log.loss.iloc[0]
    assert (tmp_path / "checkpoint" / "weights.safetensors").exists()
    loaded = load_merged(tmp_path / "model")
    check_ties(loaded)
    a, b = loaded.state_dict(), model.state_dict()
    assert count_params(loaded) == n and all(torch.equal(a[k], b[k]) for k in a)
    # rerunning resumes from the finished checkpoint: same log, same weights, no extra steps
    again = merge_model(t5_44, ["encoder:0-2@middle/vanilla", "decoder:1-2/vanilla"])
    _, log2 = recover(again, g2p_task, cfg, tmp_path, progress=False)
    assert log2.step.tolist() == [10, 20]
    c = again.state_dict()
    assert all(torch.equal(b[k], c[k]) for k in b)
    with pytest.raises(ValueError, match="test split"):
        recover(again, g2p_task, TrainConfig(steps=1, split="test"), tmp_path / "x", progress=False)


def test_recover_a_pruned_model(g2p_task, t5_44, tmp_path):
    pruned = prune_model(t5_44, "decoder", 1, 2)
    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-3, warmup=1, log_every=1, ckpt_every=2)
    _, log = recover(pruned, g2p_task, cfg, tmp_path, progress=False)
    assert log.step.tolist() == [1, 2] and (tmp_path / "model" / "model.safetensors").exists()
