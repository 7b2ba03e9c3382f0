"""FF alignment (mtlab.merging.align) and merge + tie + save/load (mtlab.merging.merge),
on tiny float64 models of every registered family (builders shared with test_anatomy).

Correlations here come from synthetic inputs pushed through each layer's w_in
(pre-activation features of the layer on Gaussian inputs); real statistics come from
mtlab.merging.stats, which plugs into the same interface.
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from test_anatomy import CASES  # tiny model builders + inputs for every registered family

from mtlab import anatomy as A
from mtlab.checkpoint import CheckpointError
from mtlab.measure import param_table
from mtlab.merging.align import check_permutation, match, permute_ff
from mtlab.merging.merge import (MERGES_NAME, WEIGHTS_NAME, MergeSpec, load_merged, merge_ffs, merged_specs,
                                 save_merged, tie_ffs, validate_specs)

torch.set_num_threads(1)
TOL = dict(atol=1e-8, rtol=1e-8)  # float64: function-preserving edits agree far below 1e-6


def _build(case: str, seed: int = 0):
    torch.manual_seed(seed)
    return CASES[case][0]().eval().double()


def _inputs(case: str) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in CASES[case][1].items()}


def _out(model, case) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(case))[0]


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _ff_numel(ff: A.FF) -> int:
    return sum(p.numel() for p in ff.params())


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, before) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


def _features(ff: A.FF, n: int = 512) -> torch.Tensor:
    """Pre-activation features of w_in (tokens x d_ff) on fixed Gaussian inputs."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, A.in_features(ff.w_in), generator=g, dtype=torch.float64)
    w = A.weight_oi(ff.w_in).detach()
    b = getattr(ff.w_in, "bias", None)
    return x @ w.T + (0 if b is None else b.detach())


def _corr(anchor: A.FF, other: A.FF) -> torch.Tensor:
    fa, fo = _features(anchor), _features(other)
    d = fa.shape[1]
    return torch.corrcoef(torch.cat([fa, fo], 1).T)[:d, d:]  # rows anchor, columns other


def _correlations(model, specs) -> dict:
    an = A.anatomy(model)
    out = {}
    for s in map(MergeSpec.parse, specs):
        stack = an.stack(s.stack)
        for i in s.others():
            out[s.stack, i] = _corr(stack.layer(s.anchor_layer()).ff, stack.layer(i).ff)
    return out


def _copy_ff(src: A.FF, dst: A.FF) -> None:
    with torch.no_grad():
        for role in ("w_in", "w_gate", "w_out"):
            s, d = getattr(src, role), getattr(dst, role)
            if s is not None:
                A.set_weight_oi(d, A.weight_oi(s).clone(), bias=None if s.bias is None else s.bias.clone())


def _all_stacks(case):
    return list(A.anatomy(_build(case)).stacks)


STACK_CASES = [(c, s) for c in CASES for s in _all_stacks(c)]


# ---------------------------------------------------------------------------
# align

def test_match_inverts_a_permuted_identity():
    p = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    corr = torch.eye(7)[:, p] * 0.9 + 0.01  # anchor neuron i <-> other neuron j with p[j] = i
    perm = match(corr)
    assert perm.dtype == torch.long
    assert torch.equal(p[perm], torch.arange(7))


def test_match_rejects_bad_matrices():
    with pytest.raises(ValueError, match="square"):
        match(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="square"):
        match(torch.zeros(3))
    with pytest.raises(ValueError, match="infinite"):
        match(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]))
    # undefined (NaN) correlations, e.g. of a constant feature, count as 0
    assert torch.equal(match(torch.tensor([[float("nan"), 0.5], [0.9, 0.1]])), torch.tensor([1, 0]))


def test_check_permutation_names_the_problem():
    assert torch.equal(check_permutation([2, 0, 1], 3), torch.tensor([2, 0, 1]))
    with pytest.raises(ValueError, match="3 entries.*d_ff = 4"):
        check_permutation([2, 0, 1], 4)
    with pytest.raises(ValueError, match="not a permutation"):
        check_permutation([0, 0, 1], 3)
    with pytest.raises(ValueError, match="not a permutation"):
        check_permutation([0, 1, 3], 3)
    with pytest.raises(ValueError, match="integers"):
        check_permutation(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="1-D"):
        check_permutation(torch.zeros(2, 2, dtype=torch.long), 2)


@pytest.mark.parametrize("case", CASES)
def test_permuting_ff_neurons_preserves_the_function(case):
    model = _build(case)
    ref = _out(model, case)
    params_before = {id(p) for p in model.parameters()}
    g = torch.Generator().manual_seed(3)
    for stack in A.anatomy(model).stacks.values():
        for layer in stack:
            ff = layer.ff
            old = A.weight_oi(ff.w_in).detach().clone()
            perm = torch.randperm(A.out_features(ff.w_in), generator=g)
            permute_ff(ff, perm)
            assert not torch.equal(A.weight_oi(ff.w_in), old)
            torch.testing.assert_close(A.weight_oi(ff.w_in), old[perm], atol=0, rtol=0)
            torch.testing.assert_close(A.weight_oi(layer.ff.w_in), old[perm], atol=0, rtol=0)
    assert {id(p) for p in model.parameters()} == params_before  # in place, same Parameters
    torch.testing.assert_close(_out(model, case), ref, **TOL)


def test_permute_ff_rejects_a_bad_permutation_and_leaves_the_ff_alone():
    model = _build("gpt2")
    ff = A.anatomy(model).stack("layers").layer(0).ff
    before = _state(model)
    with pytest.raises(ValueError, match="d_ff = 128"):
        permute_ff(ff, torch.arange(64))
    with pytest.raises(ValueError, match="not a permutation"):
        permute_ff(ff, torch.zeros(128, dtype=torch.long))
    assert _same_state(model, before)


# ---------------------------------------------------------------------------
# MergeSpec

@pytest.mark.parametrize("text, spec, canon", [
    ("encoder:2-4@middle/permute", MergeSpec("encoder", (2, 3, 4), "middle", "permute"), None),
    ("layers:0,1", MergeSpec("layers", (0, 1)), "layers:0-1@first/permute"),
    ("decoder: 5, 1-2 @ 2 / Vanilla", MergeSpec("decoder", (1, 2, 5), 2, "vanilla"), "decoder:1-2,5@2/vanilla"),
    ("layers:3-7@last", MergeSpec("layers", tuple(range(3, 8)), "last"), "layers:3-7@last/permute"),
])
def test_spec_parse_and_str(text, spec, canon):
    got = MergeSpec.parse(text)
    assert got == spec
    assert str(got) == (canon or text)
    assert MergeSpec.parse(str(got)) == got


def test_spec_anchor():
    assert MergeSpec.parse("layers:2-4@middle").anchor_layer() == 3
    assert MergeSpec.parse("layers:2-5@middle").anchor_layer() == 3  # lower middle
    assert MergeSpec.parse("layers:2-5@last").anchor_layer() == 5
    assert MergeSpec.parse("layers:2-5@4").others() == (2, 3, 5)
    assert MergeSpec("layers", (4, 2)).anchor_layer() == 2


@pytest.mark.parametrize("text", ["encoder", "encoder:", "encoder:a-b", "encoder:4-2", ":1-2", "encoder:1-2@/x"])
def test_spec_parse_errors_show_the_syntax(text):
    with pytest.raises(ValueError, match="merge spec|STACK:LAYERS"):
        MergeSpec.parse(text)


@pytest.mark.parametrize("text, msg", [
    ("encoder:0-1", r"no stack 'encoder'.*\['layers'\]"),
    ("layers:1", "at least 2 layers"),
    ("layers:1,1", r"\[1\] listed more than once"),
    ("layers:4-6", r"\[6\] out of range.*6 layers; valid layers are 0-5"),
    ("layers:1-2@0", "anchor layer 0 is not in the merge set"),
    ("layers:1-2@centre", "unknown anchor 'centre'"),
    ("layers:1-2/average", "unknown method 'average'.*permute"),
])
def test_spec_validate_errors(text, msg):
    model = T.GPT2Model(T.GPT2Config(n_embd=16, n_layer=6, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match=msg):
        MergeSpec.parse(text).validate(A.anatomy(model))


def test_specs_must_not_overlap():
    model = _build("t5")
    got = validate_specs(["decoder:0-1", MergeSpec("encoder", (0, 1))], model)
    assert got == [MergeSpec("decoder", (0, 1)), MergeSpec("encoder", (0, 1))]  # same indices, other stack: fine
    with pytest.raises(ValueError, match=r"overlap at decoder layer\(s\) \[1\].*disjoint"):
        validate_specs(["decoder:0-1", "decoder:1-2"], model)
    with pytest.raises(ValueError, match="already applied"):
        validate_specs(["decoder:1-2"], model, existing=["decoder:0-1"])


# ---------------------------------------------------------------------------
# merge_ffs

def _spec_for(case, stack, method):
    n = len(A.anatomy(_build(case)).stack(stack))
    return MergeSpec(stack, tuple(range(n)), "middle" if n > 2 else "last", method)


@pytest.mark.parametrize("case, stack", STACK_CASES)
@pytest.mark.parametrize("method", ["permute", "vanilla"])
def test_merging_identical_layers_changes_nothing_and_ties(case, stack, method):
    model = _build(case)
    st = A.anatomy(model).stack(stack)
    for i in range(1, len(st)):
        _copy_ff(st.layer(0).ff, st.layer(i).ff)
    ref, n_before = _out(model, case), _n_params(model)
    ff_numel = _ff_numel(st.layer(0).ff)
    ff_row_before = param_table(model).query("component == 'ff' and stack == @stack").params.item()
    spec = _spec_for(case, stack, method)
    assert merge_ffs(model, [spec], _correlations(model, [spec]) if method == "permute" else None) is model
    torch.testing.assert_close(_out(model, case), ref, **TOL)
    k = len(spec.layers)
    assert _n_params(model) == n_before - (k - 1) * ff_numel
    table = param_table(model)
    assert table.query("component == 'ff' and stack == @stack").params.item() == ff_row_before - (k - 1) * ff_numel
    assert table.query("component == 'total'").params.item() == _n_params(model)
    anchor = st.layer(spec.anchor_layer()).ff
    for i in spec.layers:
        ff = st.layer(i).ff
        assert [id(p) for p in ff.params()] == [id(p) for p in anchor.params()]
        if i != spec.anchor_layer():
            assert ff.w_in is not anchor.w_in  # modules stay distinct (per-layer hooks), Parameters are shared
    assert model.config.mtlab_merges == [str(spec)]
    assert merged_specs(model) == [spec]


@pytest.mark.parametrize("case", CASES)
def test_permute_merge_recovers_a_permuted_copy(case):
    model = _build(case)
    an = A.anatomy(model)
    stack = next(reversed(an.stacks.values()))  # the decoder where there is one
    src, dst = stack.layer(0).ff, stack.layer(1).ff
    _copy_ff(src, dst)
    original = {r: A.weight_oi(getattr(src, r)).detach().clone() for r in ("w_in", "w_gate", "w_out")
                if getattr(src, r) is not None}
    ref = _out(model, case)
    perm = torch.randperm(A.out_features(dst.w_in), generator=torch.Generator().manual_seed(5))
    permute_ff(dst, perm)
    torch.testing.assert_close(_out(model, case), ref, **TOL)  # a permuted copy computes the same
    spec = MergeSpec(stack.name, (0, 1), "first", "permute")
    corr = _correlations(model, [spec])
    vanilla = merge_ffs(_clone(model, case), [MergeSpec(stack.name, (0, 1), "first", "vanilla")])
    merge_ffs(model, [spec], corr)
    merged = stack.layer(1).ff
    for role, w in original.items():
        torch.testing.assert_close(A.weight_oi(getattr(merged, role)), w, **TOL)
    torch.testing.assert_close(_out(model, case), ref, **TOL)
    assert not torch.allclose(_out(vanilla, case), ref, atol=1e-6)  # averaging unaligned neurons breaks it


def _clone(model, case):
    other = CASES[case][0]().eval().double()
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("case", ["t5", "t5-gated", "bart", "marian", "gpt2", "bert", "vit", "llama"])
def test_vanilla_and_permute_differ_on_random_layers(case):
    model = _build(case)
    stack = next(reversed(A.anatomy(model).stacks.values())).name
    spec = MergeSpec(stack, (0, 1), "last")
    corr = _correlations(model, [spec])
    ref = _out(model, case)
    perm = merge_ffs(_clone(model, case), [spec], corr)
    van = merge_ffs(_clone(model, case), [MergeSpec(stack, (0, 1), "last", "vanilla")])
    a, b = (A.anatomy(m).stack(stack).layer(1).ff for m in (perm, van))
    assert not torch.allclose(A.weight_oi(a.w_in), A.weight_oi(b.w_in))
    assert not torch.allclose(_out(perm, case), _out(van, case))
    assert not torch.allclose(_out(perm, case), ref)


def test_several_sets_encoder_and_decoder_and_callable_correlations():
    model = _build("t5")  # encoder 2 layers, decoder 3
    an = A.anatomy(model)
    n0, ff_enc, ff_dec = _n_params(model), _ff_numel(an.stack("encoder").layer(0).ff), _ff_numel(
        an.stack("decoder").layer(0).ff)
    asked = []

    def correlate(spec):
        asked.append(str(spec))
        st = A.anatomy(model).stack(spec.stack)
        return {i: _corr(st.layer(spec.anchor_layer()).ff, st.layer(i).ff) for i in spec.others()}

    specs = ["encoder:0-1@last", "decoder:0-2@middle/permute"]
    merge_ffs(model, specs, correlate)
    assert asked == ["encoder:0-1@last/permute", "decoder:0-2@middle/permute"]
    assert _n_params(model) == n0 - ff_enc - 2 * ff_dec
    assert model.config.mtlab_merges == ["encoder:0-1@last/permute", "decoder:0-2@middle/permute"]
    with pytest.raises(ValueError, match="already applied"):  # a layer is tied once
        merge_ffs(model, ["decoder:1-2/vanilla"])


def test_tied_training_keeps_one_copy():
    model = _build("bart")
    merge_ffs(model, ["decoder:0-2/vanilla"])
    st = A.anatomy(model).stack("decoder")
    shared = st.layer(0).ff.w_in.weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = shared.detach().clone()
    _out_train = model(**_inputs("bart"))[0].sum()
    _out_train.backward()
    opt.step()
    assert all(st.layer(i).ff.w_in.weight is shared for i in range(3))
    assert not torch.equal(shared, before)


@pytest.mark.parametrize("specs, corr, msg", [
    (["decoder:1-3"], "ok", r"\[3\] out of range.*valid layers are 0-2"),
    (["decoder:0-1", "decoder:1-2"], "ok", "overlap"),
    (["decoder:0-1"], None, "missing correlations"),
    (["decoder:0-2"], "drop1", r"missing correlation matrix for decoder layer 1"),
    (["decoder:0-1"], "nonsquare", "square"),
    (["decoder:0-1"], "small", "d_ff = 64"),
    (["encoder:0-1", "decoder:0-1"], "enc-only", "missing correlation matrix for decoder layer 1"),
    (["encoder:0-1", "decoder:0-1"], "not-a-dict", "dict"),
    (["encoder:0-1/vanilla", "decoder:0-2"], "bad-callable", "must return a dict"),
])
def test_bad_input_leaves_the_model_unchanged(specs, corr, msg):
    model = _build("t5")
    an = A.anatomy(model)
    good = {(s.name, i): _corr(s.layer(0).ff, s.layer(i).ff) for s in an.stacks.values() for i in range(1, len(s))}
    corrs = {"ok": good, None: None,
             "drop1": {k: v for k, v in good.items() if k != ("decoder", 1)},
             "nonsquare": {k: v[:, :10] for k, v in good.items()},
             "small": {k: v[:32, :32] for k, v in good.items()},
             "enc-only": {k: v for k, v in good.items() if k[0] == "encoder"},
             "not-a-dict": [1, 2],
             "bad-callable": lambda spec: [good]}[corr]
    before = _state(model)
    with pytest.raises(ValueError, match=msg):
        merge_ffs(model, specs, corrs)
    assert _same_state(model, before)
    assert not getattr(model.config, "mtlab_merges", None)
    assert len({id(p) for p in model.parameters()}) == len(list(model.parameters()))  # nothing tied
    merge_ffs(model, ["encoder:0-1", "decoder:0-2"], good)  # and the good input does merge


def test_mismatched_ff_shapes_are_refused():
    model = _build("llama")
    st = A.anatomy(model).stack("layers")
    A.set_weight_oi(st.layer(1).ff.w_out, A.weight_oi(st.layer(1).ff.w_out)[:, :32])
    before = _state(model)
    with pytest.raises(ValueError, match="identical shape"):
        merge_ffs(model, ["layers:0-1/vanilla"])
    assert _same_state(model, before)


# ---------------------------------------------------------------------------
# save / load

def _file_size(d) -> int:
    return (d / WEIGHTS_NAME).stat().st_size


@pytest.mark.parametrize("case", ["t5", "t5-gated", "bart", "gpt2", "vit", "llama"])
def test_save_and_load_keep_the_tying(case, tmp_path):
    model = _build(case)
    stack = next(reversed(A.anatomy(model).stacks.values())).name
    spec = MergeSpec(stack, (0, 1), "last")
    save_merged(model, tmp_path / "plain")
    merge_ffs(model, [spec], _correlations(model, [spec]))
    ref, n = _out(model, case), _n_params(model)
    ff_bytes = _ff_numel(A.anatomy(model).stack(stack).layer(0).ff) * 8  # float64
    out = save_merged(model, tmp_path / "merged")
    saved = _file_size(tmp_path / "plain") - _file_size(out)
    assert abs(saved - ff_bytes) < 2048  # one FF sublayer less on disk (headers differ slightly)
    record = json.loads((out / MERGES_NAME).read_text())
    assert record["merges"] == [str(spec)]
    assert json.loads((out / "config.json").read_text())["mtlab_merges"] == [str(spec)]

    again = load_merged(out)
    assert type(again) is type(model) and not again.training
    st = A.anatomy(again).stack(stack)
    assert [id(p) for p in st.layer(0).ff.params()] == [id(p) for p in st.layer(1).ff.params()]
    assert _n_params(again) == n
    assert next(again.parameters()).dtype == torch.float64
    assert torch.equal(_out(again, case), ref)
    assert again.config.mtlab_merges == [str(spec)]
    # and a re-save over the same directory (atomic replace) round-trips too
    save_merged(again, out)
    assert torch.equal(_out(load_merged(out, type(model)), case), ref)


def test_transformers_save_pretrained_is_not_relied_on(tmp_path):
    """Why save_merged writes the state dict itself: transformers refuses (5.x) or silently drops
    (4.x) tensors shared outside its known tied-weight keys."""
    model = merge_ffs(_build("bart"), ["encoder:0-1/vanilla"])
    try:
        model.save_pretrained(tmp_path / "hf")
    except RuntimeError as e:
        assert "shared tensors" in str(e)
    save_merged(model, tmp_path / "ours")
    assert (tmp_path / "ours" / WEIGHTS_NAME).exists()


def test_corrupt_or_incomplete_checkpoints_raise_checkpoint_error(tmp_path):
    model = merge_ffs(_build("gpt2"), ["layers:0-1/vanilla"])
    d = save_merged(model, tmp_path / "m")
    f = d / WEIGHTS_NAME
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_merged(d)
    f.write_bytes(data)
    load_merged(d)
    (d / MERGES_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match=MERGES_NAME):
        load_merged(d)
    (d / MERGES_NAME).unlink()
    with pytest.raises(CheckpointError):
        load_merged(d)


def test_tie_ffs_only_ties():
    model = _build("llama")
    st = A.anatomy(model).stack("layers")
    w0 = A.weight_oi(st.layer(0).ff.w_in).detach().clone()
    tie_ffs(model, ["layers:0-1@first/permute"])
    assert st.layer(1).ff.w_in.weight is st.layer(0).ff.w_in.weight
    assert torch.equal(st.layer(1).ff.w_in.weight, w0)


def test_plain_transformers_on_a_merged_folder_points_to_load_merged(tmp_path):
    """A save_merged folder loaded with plain transformers must say to use mtlab.merging.load_merged
    (it suggested upgrading transformers), and that name must exist (issue 22, item 12)."""
    import importlib

    model = merge_ffs(_build("t5"), ["encoder:0-1/vanilla"])
    d = save_merged(model, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    assert config["mtlab_load_with"] == "mtlab.merging.load_merged(folder)"
    for load in (T.AutoConfig.from_pretrained, T.AutoModelForSeq2SeqLM.from_pretrained,
                 T.T5ForConditionalGeneration.from_pretrained):
        with pytest.raises((ValueError, AttributeError, TypeError)) as e:
            load(d)
        assert "mtlab.merging.load_merged" in str(e.value), (load, str(e.value))
    named = importlib.import_module("mtlab.merging").load_merged  # the name every message gives
    again = named(d)
    assert "mtlab_load_with" not in again.config.to_dict()
    assert torch.equal(_out(again, "t5"), _out(model, "t5"))
    assert "from mtlab.merging import load_merged" in (d / "README.md").read_text()


def test_merged_models_with_a_deeper_decoder_generate_plainly(tmp_path):
    """merge_model and load_merged return models whose plain generate() sizes its cache from the
    decoder (the tiny T5 here has 2 encoder and 3 decoder layers; issue 22, item 2)."""
    from mtlab.merging.build import merge_model
    from mtlab.tasks.base import cache_kwargs

    model = merge_model(_build("t5").float(), ["decoder:0-2@middle/vanilla"])
    again = load_merged(save_merged(model, tmp_path / "m"))
    ids = torch.tensor([[3, 7, 11, 5, 9, 2]])
    for m in (model, again):
        with torch.no_grad():
            want = m.generate(input_ids=ids, max_new_tokens=4, **cache_kwargs(m))
            assert torch.equal(m.generate(input_ids=ids, max_new_tokens=4), want)
