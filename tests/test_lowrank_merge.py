"""Tied FF sublayers with low-rank per-layer deltas (merge method "permute_lowrank",
mtlab.merging.lowrank): the spec's r, the two ends (r = full rank is the original, r = 0 is permute
merging), parameter counts, recovery, save/load and export, and bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from test_anatomy import CASES
from test_merge import _build, _correlations, _inputs, _out

from mtlab import anatomy as A
from mtlab.measure import count_params, param_table
from mtlab.merging.build import check_ties
from mtlab.merging.lowrank import DELTA_NAME, LowRankDelta, delta_params, deltas, effective_weight, max_rank
from mtlab.merging.merge import load_merged, merge_ffs, merged_specs, save_merged
from mtlab.merging.methods import get_merge_method, merge_methods
from mtlab.merging.spec import MergeSpec

torch.set_num_threads(1)
TOL = dict(atol=1e-8, rtol=1e-8)


def _stack(model) -> str:
    return next(reversed(A.anatomy(model).stacks.values())).name  # the decoder where there is one


def _spec(model, method: str) -> MergeSpec:
    s = _stack(model)
    n = len(A.anatomy(model).stack(s))
    return MergeSpec.parse(f"{s}:0-{n - 1}@last/{method}")


def _merged(model, method: str):
    out = copy.deepcopy(model)
    spec = _spec(model, method)
    return merge_ffs(out, [spec], _correlations(copy.deepcopy(out).double(), [spec])), spec


# ---------------------------------------------------------------------------
# the spec


def test_the_rank_is_part_of_the_spec_text():
    s = MergeSpec.parse("encoder:3-5@middle/permute_lowrank:r=8")
    assert (s.method, s.options, s.option("r")) == ("permute_lowrank", (("r", 8),), 8)
    assert str(s) == "encoder:3-5@middle/permute_lowrank:r=8" and MergeSpec.parse(str(s)) == s
    # the default rank is written out, so a recorded merge never depends on a default
    assert str(MergeSpec.parse("layers:0-1/permute_lowrank")) == "layers:0-1@first/permute_lowrank:r=8"
    assert (MergeSpec("layers", (0, 1), "first", "permute_lowrank:r=3")
            == MergeSpec.parse("layers:0-1/permute_lowrank:r=3"))
    assert MergeSpec("layers", (0, 1), method="permute_lowrank", options={"r": 3}).option("r") == 3
    assert str(MergeSpec.parse("layers:0-1/permute")) == "layers:0-1@first/permute"  # no options: as before
    assert "permute_lowrank" in merge_methods() and "permute_lowrank" not in merge_methods(searched=True)
    assert get_merge_method("permute_lowrank").options == {"r": 8}


def test_bad_options_name_the_fix():
    bert = _build("bert")
    with pytest.raises(ValueError, match="must be a int.*permute_lowrank:r=8"):
        MergeSpec.parse("layers:0-1/permute_lowrank:r=big")
    with pytest.raises(ValueError, match="write OPTION=VALUE"):
        MergeSpec.parse("layers:0-1/permute_lowrank:8")
    with pytest.raises(ValueError, match="has no option.*'k'.*permute_lowrank:r=8"):
        MergeSpec.parse("layers:0-1/permute_lowrank:k=2").validate(bert)
    with pytest.raises(ValueError, match="takes no options.*without"):
        MergeSpec.parse("layers:0-1/permute:r=2").validate(bert)


# ---------------------------------------------------------------------------
# the two ends: full rank and rank 0

@pytest.mark.parametrize("case", ["bert", "gpt2", "t5-gated", "bart", "llama"])
def test_full_rank_reproduces_the_original_layers(case):
    model = _build(case)
    ref = _out(model, case)
    ff = A.anatomy(model).stack(_stack(model)).layer(0).ff
    full = max_rank(ff)
    merged, spec = _merged(model, f"permute_lowrank:r={full}")
    plain, _ = _merged(model, "permute")
    torch.testing.assert_close(_out(merged, case), ref, **TOL)
    assert not torch.allclose(_out(plain, case), ref, atol=1e-6)  # without deltas the merge changes the function
    check_ties(merged)
    st = A.anatomy(merged).stack(spec.stack)
    anchor = st.layer(spec.anchor_layer()).ff
    for i in spec.layers:  # each layer: the shared average plus its own delta
        f = st.layer(i).ff
        assert f.w_in.weight is anchor.w_in.weight
        assert isinstance(getattr(f.w_in, DELTA_NAME), LowRankDelta)
        assert getattr(f.w_in, DELTA_NAME) is not getattr(anchor.w_in, DELTA_NAME) or i == spec.anchor_layer()
    assert merged_specs(merged) == [spec]


def test_full_rank_in_float32_keeps_the_logits_to_1e5():
    torch.manual_seed(0)
    model = CASES["gpt2"][0]().eval()
    inputs = CASES["gpt2"][1]
    with torch.no_grad():
        ref = model(**inputs).logits
    merged, _ = _merged(model, f"permute_lowrank:r={max_rank(A.anatomy(model).stack('layers').layer(0).ff)}")
    with torch.no_grad():
        got = merged(**inputs).logits
    assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", ["bert", "t5", "llama"])
def test_rank_zero_is_plain_permute_merging(case):
    model = _build(case)
    zero, _ = _merged(model, "permute_lowrank:r=0")
    plain, _ = _merged(model, "permute")
    assert not deltas(zero) and count_params(zero) == count_params(plain)
    a, b = zero.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(_out(zero, case), _out(plain, case), atol=0, rtol=0)


@pytest.mark.parametrize("case, r", [("bert", 3), ("gpt2", 5), ("t5-gated", 2)])
def test_parameters_count_the_tied_average_and_every_delta(case, r):
    model = _build(case)
    merged, spec = _merged(model, f"permute_lowrank:r={r}")
    plain, _ = _merged(model, "permute")
    ff = A.anatomy(model).stack(spec.stack).layer(0).ff
    per_layer = sum(r * (A.out_features(m) + A.in_features(m)) + (A.out_features(m) if m.bias is not None else 0)
                    for m in (ff.w_in, ff.w_gate, ff.w_out) if m is not None)
    assert delta_params(merged) == len(spec.layers) * per_layer
    assert count_params(merged) == count_params(plain) + len(spec.layers) * per_layer
    assert count_params(plain) < count_params(merged) < count_params(model)
    t_m, t_p = param_table(merged), param_table(plain)
    row = f"component == 'ff' and stack == '{spec.stack}'"
    assert t_m.query(row).params.item() == t_p.query(row).params.item() + len(spec.layers) * per_layer
    # each layer computes the average plus a rank-r delta
    st = A.anatomy(merged).stack(spec.stack)
    w0 = A.weight_oi(st.layer(0).ff.w_in)
    for i in spec.layers:
        w, _ = effective_weight(st.layer(i).ff.w_in)
        assert torch.linalg.matrix_rank(w - w0).item() <= r


def test_truncated_deltas_are_the_best_rank_r_approximation():
    model = _build("bert")
    merged, spec = _merged(model, "permute_lowrank:r=2")
    full, _ = _merged(model, f"permute_lowrank:r={max_rank(A.anatomy(model).stack('layers').layer(0).ff)}")
    for i in spec.layers:
        d2 = getattr(A.anatomy(merged).stack("layers").layer(i).ff.w_out, DELTA_NAME).weight_oi()
        dfull = getattr(A.anatomy(full).stack("layers").layer(i).ff.w_out, DELTA_NAME).weight_oi()
        u, s, vh = torch.linalg.svd(dfull)
        torch.testing.assert_close(d2, (u[:, :2] * s[:2]) @ vh[:2], atol=1e-10, rtol=1e-8)


# ---------------------------------------------------------------------------
# recovery, save/load, export

def test_recovery_trains_the_deltas_and_the_tied_average_and_saves_them(g2p_task, tiny_t5, tmp_path):
    from mtlab.merging.build import merge_model, tie_groups
    from mtlab.merging.recover import recover
    from mtlab.train import TrainConfig

    merged = merge_model(tiny_t5.eval(), ["encoder:0-1@first/permute_lowrank:r=2"],
                         batches_fn=lambda: g2p_task.iter_batches("train", 8), max_tokens=300)
    before = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    n0 = count_params(merged)
    shared = [ps[0] for _, ps in tie_groups(merged)]
    model, log = recover(merged.train(), g2p_task, TrainConfig(steps=3, batch_size=8, lr=1e-2, warmup=0, log_every=1,
                                                               ckpt_every=3), tmp_path, progress=False)
    check_ties(model)
    assert count_params(model) == n0 and int(log.step.max()) == 3
    after = model.state_dict()
    moved = [k for k in before if DELTA_NAME in k and not torch.equal(before[k], after[k])]
    assert {k.rsplit(".", 1)[1] for k in moved} == {"u", "v"}  # T5 has no biases: u and v of every delta
    assert len(moved) == 2 * 2 * 2  # 2 layers x 2 projections (wi, wo) x (u, v)
    assert all(not torch.equal(p, before[k]) for k, p in after.items() if k.endswith("DenseReluDense.wi.weight"))
    assert shared[0] is tie_groups(model)[0][1][0]  # the tied Parameter is the one trained
    again = load_merged(tmp_path / "model")
    b = g2p_task.collate("dev", [0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(again(**b.model_inputs()).logits, model.eval()(**b.model_inputs()).logits,
                                   atol=0, rtol=0)
    check_ties(again)
    assert len(deltas(again)) == 4 and merged_specs(again) == merged_specs(model)


@pytest.mark.parametrize("case", ["bert", "gpt2"])
def test_save_and_load_keep_deltas_and_ties(case, tmp_path):
    model = _build(case)
    merged, spec = _merged(model, "permute_lowrank:r=3")
    save_merged(merged, tmp_path / "m")
    again = load_merged(tmp_path / "m")
    check_ties(again)
    assert merged_specs(again) == [spec] and count_params(again) == count_params(merged)
    assert deltas(again).keys() == deltas(merged).keys()
    torch.testing.assert_close(_out(again, case), _out(merged, case), atol=0, rtol=0)


@pytest.mark.parametrize("case", ["bert", "gpt2", "t5"])
def test_export_folds_the_deltas_into_plain_layers(case, tmp_path):
    from safetensors.torch import load_file

    from mtlab.export import auto_class, export

    torch.manual_seed(0)
    model = CASES[case][0]().eval()
    spec = _spec(model, "permute_lowrank:r=2")
    merge_ffs(model, [spec], _correlations(copy.deepcopy(model).double(), [spec]))
    d = export(model, tmp_path / "plain")
    keys = load_file(str(d / "model.safetensors")).keys()
    assert not [k for k in keys if DELTA_NAME in k]
    plain = getattr(T, auto_class(model)).from_pretrained(str(d)).eval()
    assert not deltas(plain)
    inputs = CASES[case][1]
    with torch.no_grad():
        a, b = model(**inputs)[0], plain(**inputs)[0]
    assert (a - b).abs().max().item() < 1e-5
    # the plain copy has every layer's own weights: the merged model's effective weights
    st, pst = A.anatomy(model).stack(spec.stack), A.anatomy(plain).stack(spec.stack)
    for i in spec.layers:
        w, _ = effective_weight(st.layer(i).ff.w_out)
        torch.testing.assert_close(A.weight_oi(pst.layer(i).ff.w_out), w.detach(), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------
# bad input

def test_a_rank_the_layers_do_not_allow_is_refused_before_anything_changes():
    model = _build("bert")  # FF 64 x 32: full rank 32
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = MergeSpec.parse("layers:0-1/permute_lowrank:r=33")
    with pytest.raises(ValueError, match=r"r=33 is larger.*full rank 32.*use r <= 32"):
        merge_ffs(model, [spec], _correlations(model, [spec]))
    with pytest.raises(ValueError, match="negative"):
        merge_ffs(model, ["layers:0-1/permute_lowrank:r=-1"], _correlations(model, [spec]))
    now = model.state_dict()
    assert now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in now)
    assert not deltas(model) and not merged_specs(model)


def test_a_model_without_ff_handles_is_refused_with_the_fix():
    model = T.DistilBertModel(T.DistilBertConfig(dim=16, n_layers=2, n_heads=2, hidden_dim=32, vocab_size=40))
    with pytest.raises(A.UnsupportedArchitectureError, match=r"register\(ArchSpec"):
        merge_ffs(model, ["layers:0-1/permute_lowrank:r=2"], {})


def test_window_search_compares_ranks_named_with_their_options():
    from test_merge_search import tiny_bert_and_batches

    from mtlab.merging.windows import window_search

    bert, data = tiny_bert_and_batches()
    with torch.no_grad():
        ref = bert(**data[0]).last_hidden_state

    def score(m):
        with torch.no_grad():
            return {"cos": torch.nn.functional.cosine_similarity(m(**data[0]).last_hidden_state, ref, -1).mean().item()}

    df = window_search(bert, score_fn=score, align_batches=lambda: data, higher_is_better=True, sizes=[2], starts=[0],
                       methods=["permute", "permute_lowrank:r=2", "permute_lowrank:r=32"], align_tokens=200,
                       include_pruning=False, progress=False)
    rows = df[df.kind == "merge"].set_index("method")
    assert list(rows.index) == ["permute", "permute_lowrank:r=2", "permute_lowrank:r=32"]
    assert rows.spec["permute_lowrank:r=2"] == "layers:0-1@middle/permute_lowrank:r=2"
    assert rows.params["permute"] < rows.params["permute_lowrank:r=2"] < rows.params["permute_lowrank:r=32"]
    assert rows.cos["permute_lowrank:r=32"] == pytest.approx(1.0, abs=1e-6)  # full rank: the original
    assert rows.cos["permute"] < 1 - 1e-6
    with pytest.raises(ValueError, match="unknown method"):
        window_search(bert, score_fn=score, align_batches=lambda: data, higher_is_better=True, methods=["lowrank:r=2"],
                      progress=False)


@pytest.mark.parametrize("case", ["bert", "gpt2"])
def test_a_lone_survivor_keeps_its_delta_as_its_own_weight(case, tmp_path):
    """Dropping every other layer of a permute_lowrank set leaves one plain layer: its delta is folded
    into its own weight (same outputs), the record is forgotten, and save_merged/load_merged replays it."""
    from mtlab.surgery import drop_blocks

    model = _build(case)
    merged, spec = _merged(model, "permute_lowrank:r=3")
    stack = A.anatomy(merged).stack(spec.stack)
    reference = copy.deepcopy(merged)  # the survivor with its delta hooked on, cut by hand
    A.set_stack_layers(reference, spec.stack, [A.anatomy(reference).stack(spec.stack).layers[0]])
    got = drop_blocks(merged, {spec.stack: list(range(1, len(stack)))})
    assert deltas(got) == {} and merged_specs(got) == [] and len(deltas(merged)) > 0  # the input is untouched
    torch.testing.assert_close(_out(got, case), _out(reference, case), atol=1e-10, rtol=1e-10)
    save_merged(got, tmp_path / "m")
    torch.testing.assert_close(_out(load_merged(tmp_path / "m"), case), _out(got, case), atol=0, rtol=0)
