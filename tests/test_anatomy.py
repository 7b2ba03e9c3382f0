"""mtlab.anatomy against tiny randomly initialised models of every registered family.

The key check recomputes each FF sublayer by hand from the modules anatomy()
returns and compares with what the model actually computed in a forward
pass, so a wrong path (e.g. attention.output.dense instead of output.dense)
cannot pass unnoticed.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from mtlab import anatomy as A

torch.set_num_threads(1)

V = 64  # vocab
IDS = torch.tensor([[3, 7, 11, 5, 9, 2]])
DEC = torch.tensor([[0, 4, 8, 12]])
S2S = {"input_ids": IDS, "decoder_input_ids": DEC}
CLM = {"input_ids": IDS}
PIX = {"pixel_values": torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))}
TOK = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0)


def _t5(cls=T.T5ForConditionalGeneration, config=T.T5Config, **kw):
    return cls(config(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=2, d_kv=16,
                      vocab_size=V, pad_token_id=1, eos_token_id=2, decoder_start_token_id=0, **kw))


def _bart_like(cls, config, **kw):
    return cls(config(d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=48, vocab_size=V,
                      max_position_embeddings=32, forced_eos_token_id=None, **TOK, **kw))


def _llama_like(cls, config):
    return cls(config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=V, max_position_embeddings=32,
                      pad_token_id=1, bos_token_id=0, eos_token_id=2))


def _bert_like(cls, config):
    return cls(config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      vocab_size=V, max_position_embeddings=32, pad_token_id=1))


VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=8,
           patch_size=4)
GPT2 = dict(n_embd=32, n_layer=2, n_head=2, vocab_size=V, n_positions=32, bos_token_id=0, eos_token_id=2)

# id -> (builder, inputs, family, {stack: (path, n_layers)}, config attribute naming the activation)
CASES = {
    "t5": (lambda: _t5(), S2S, "t5", {"encoder": ("encoder.block", 2), "decoder": ("decoder.block", 3)},
           "dense_act_fn"),
    "t5-gated": (lambda: _t5(feed_forward_proj="gated-gelu"), S2S, "t5",
                 {"encoder": ("encoder.block", 2), "decoder": ("decoder.block", 3)}, "dense_act_fn"),
    "t5-encoder-only": (lambda: _t5(T.T5EncoderModel), CLM, "t5", {"encoder": ("encoder.block", 2)},
                        "dense_act_fn"),
    "mt5": (lambda: _t5(T.MT5ForConditionalGeneration, T.MT5Config), S2S, "t5",
            {"encoder": ("encoder.block", 2), "decoder": ("decoder.block", 3)}, "dense_act_fn"),
    "bart": (lambda: _bart_like(T.BartForConditionalGeneration, T.BartConfig), S2S, "bart",
             {"encoder": ("model.encoder.layers", 2), "decoder": ("model.decoder.layers", 3)},
             "activation_function"),
    "bart-bare": (lambda: _bart_like(T.BartModel, T.BartConfig), S2S, "bart",
                  {"encoder": ("encoder.layers", 2), "decoder": ("decoder.layers", 3)}, "activation_function"),
    "marian": (lambda: _bart_like(T.MarianMTModel, T.MarianConfig, decoder_vocab_size=V), S2S, "marian",
               {"encoder": ("model.encoder.layers", 2), "decoder": ("model.decoder.layers", 3)},
               "activation_function"),
    "mbart": (lambda: _bart_like(T.MBartForConditionalGeneration, T.MBartConfig), S2S, "mbart",
              {"encoder": ("model.encoder.layers", 2), "decoder": ("model.decoder.layers", 3)},
              "activation_function"),
    "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(**GPT2)), CLM, "gpt2", {"layers": ("transformer.h", 2)},
             "activation_function"),
    "gpt2-bare": (lambda: T.GPT2Model(T.GPT2Config(**GPT2)), CLM, "gpt2", {"layers": ("h", 2)},
                  "activation_function"),
    "bert": (lambda: _bert_like(T.BertModel, T.BertConfig), CLM, "bert", {"layers": ("encoder.layer", 2)},
             "hidden_act"),
    "bert-head": (lambda: _bert_like(T.BertForSequenceClassification, T.BertConfig), CLM, "bert",
                  {"layers": ("bert.encoder.layer", 2)}, "hidden_act"),
    "roberta": (lambda: _bert_like(T.RobertaForMaskedLM, T.RobertaConfig), CLM, "bert",
                {"layers": ("roberta.encoder.layer", 2)}, "hidden_act"),
    "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(**VIT, num_labels=3)), PIX, "vit",
            {"layers": ("vit.layers", 2)}, "hidden_act"),
    "llama": (lambda: _llama_like(T.LlamaForCausalLM, T.LlamaConfig), CLM, "llama",
              {"layers": ("model.layers", 2)}, "hidden_act"),
    "mistral": (lambda: _llama_like(T.MistralForCausalLM, T.MistralConfig), CLM, "mistral",
                {"layers": ("model.layers", 2)}, "hidden_act"),
    "qwen2": (lambda: _llama_like(T.Qwen2ForCausalLM, T.Qwen2Config), CLM, "qwen2",
              {"layers": ("model.layers", 2)}, "hidden_act"),
}

_built: dict[str, nn.Module] = {}


def _model(case: str) -> nn.Module:
    """Each tiny model is built once per session (seeded), and always handed out in eval mode."""
    if case not in _built:
        torch.manual_seed(0)
        _built[case] = CASES[case][0]().eval()
    return _built[case]


def _out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


def test_every_family_is_covered():
    assert {c[2] for c in CASES.values()} == set(A.families())


@pytest.mark.parametrize("case", CASES)
def test_stacks_and_module_types(case):
    _, _, family, stacks, _ = CASES[case]
    an = A.anatomy(_model(case))
    assert an.family == family
    assert {n: (s.path, len(s)) for n, s in an.stacks.items()} == stacks
    assert list(an.stacks) == list(stacks)  # encoder before decoder
    proj = Conv1D if family == "gpt2" else nn.Linear
    gated = getattr(an.model.config, "is_gated_act", False) or family in ("llama", "mistral", "qwen2")
    assert gated == (case in ("t5-gated", "mt5") or family in ("llama", "mistral", "qwen2"))  # mT5 is gated-gelu
    for stack in an.stacks.values():
        assert isinstance(stack.layers, nn.ModuleList)
        for i, layer in enumerate(stack):
            assert layer.index == i and layer.block is stack.layers[i]
            ff = layer.ff
            for m in (ff.w_in, ff.w_out, layer.attn_out) + ((ff.w_gate,) if gated else ()):
                assert type(m) is proj
            assert ff.gated == gated
            assert A.out_features(ff.w_in) == A.in_features(ff.w_out)
            assert A.out_features(ff.w_out) == A.out_features(layer.attn_out)
            assert ff.act is not None
            expected_params = sum(len(list(m.parameters())) for m in (ff.w_in, ff.w_gate, ff.w_out) if m)
            assert len(ff.params()) == expected_params
            # every FF module lives inside its container, and the container inside the block
            inside = {id(m) for m in ff.container.modules()}
            assert all(id(m) in inside for m in (ff.w_in, ff.w_out) + ((ff.w_gate,) if gated else ()))
            assert any(m is ff.container for m in layer.block.modules())


def test_t5_gated_roles():
    """HF T5DenseGatedActDense computes wo(act(wi_0 x) * wi_1 x): wi_0 is the gate."""
    dense = _model("t5-gated").encoder.block[0].layer[-1].DenseReluDense
    ff = A.anatomy(_model("t5-gated")).stack("encoder").layer(0).ff
    assert ff.w_gate is dense.wi_0 and ff.w_in is dense.wi_1 and ff.w_out is dense.wo
    ff = A.anatomy(_model("t5")).stack("decoder").layer(-1).ff  # decoder FF is layer[2], not layer[1]
    dense = _model("t5").decoder.block[-1].layer[2].DenseReluDense
    assert ff.w_in is dense.wi and ff.w_gate is None and ff.container is dense


def _linear(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, A.weight_oi(m), m.bias)


@pytest.mark.parametrize("case", CASES)
def test_ff_modules_compute_the_ff_output(case):
    """Hook w_in's input, w_out's output and the container's output during a real forward;
    recompute the FF from the weights and the config's activation."""
    _, inputs, _, _, act_attr = CASES[case]
    model = _model(case)
    act = ACT2FN[getattr(model.config, act_attr)]
    layers = [layer for stack in A.anatomy(model).stacks.values() for layer in stack]
    seen, hooks = {}, []
    for k, layer in enumerate(layers):
        ff = layer.ff
        hooks.append(ff.w_in.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(("x", k), i[0])))
        hooks.append(ff.w_out.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(("y", k), o)))
        hooks.append(ff.container.register_forward_hook(
            lambda m, i, o, k=k: seen.__setitem__(("c", k), o[0] if isinstance(o, tuple) else o)))
    try:
        _out(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for k, layer in enumerate(layers):
            ff, x, y = layer.ff, seen["x", k], seen["y", k]
            h = act(_linear(ff.w_in, x)) if ff.w_gate is None else act(_linear(ff.w_gate, x)) * _linear(ff.w_in, x)
            torch.testing.assert_close(_linear(ff.w_out, h), y, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ff.w_out(ff.hidden(x)), y, atol=1e-5, rtol=1e-5)
            if ff.container is not layer.block:  # a dedicated MLP module returns exactly the FF output
                torch.testing.assert_close(seen["c", k], y, atol=1e-6, rtol=1e-6)


def _changes_output(model, inputs, modules) -> bool:
    """Zero the modules' weights and biases, run, restore; True if the model output moved."""
    ref = _out(model, inputs)
    saved = [(p, p.detach().clone()) for m in modules for p in m.parameters()]
    with torch.no_grad():
        for p, _ in saved:
            p.zero_()
    try:
        return not torch.allclose(_out(model, inputs), ref, atol=1e-6)
    finally:
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v)


@pytest.mark.parametrize("case", CASES)
def test_ff_out_and_attn_out_are_live(case):
    _, inputs, _, _, _ = CASES[case]
    model = _model(case)
    for stack in A.anatomy(model).stacks.values():
        for i in (0, len(stack) - 1):
            layer = stack.layer(i)
            assert _changes_output(model, inputs, [layer.ff.w_out]), f"{stack.name}[{i}] ff.w_out"
            assert _changes_output(model, inputs, [layer.attn_out]), f"{stack.name}[{i}] attn_out"


def test_layer_is_resolved_fresh_after_replacement():
    model = _t5()
    stack = A.anatomy(model).stack("encoder")
    new = nn.Linear(64, 32, bias=False)
    model.encoder.block[1].layer[-1].DenseReluDense.wo = new
    assert stack.layer(1).ff.w_out is new


def test_stack_and_layer_errors_name_the_valid_choices():
    an = A.anatomy(_model("gpt2"))
    with pytest.raises(KeyError, match=r"\['layers'\]"):
        an.stack("encoder")
    stack = an.stack("layers")
    assert stack.layer(-1).index == 1
    with pytest.raises(IndexError, match=r"\[0, 1\]"):
        stack.layer(2)


# ---------------------------------------------------------------------------
# weight helpers

def test_weight_oi_linear_and_conv1d_agree_on_orientation():
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    lin, conv = nn.Linear(3, 5), Conv1D(nf=5, nx=3)
    for m in (lin, conv):
        w = A.weight_oi(m)
        assert w.shape == (5, 3) and A.out_features(m) == 5 and A.in_features(m) == 3
        torch.testing.assert_close(m(x), F.linear(x, w, m.bias))
    assert A.weight_oi(lin) is lin.weight
    assert A.weight_oi(conv).data_ptr() == conv.weight.data_ptr()  # a view, edits reach the module
    with pytest.raises(TypeError):
        A.weight_oi(nn.Embedding(3, 4))


@pytest.mark.parametrize("make", [lambda: nn.Linear(3, 5), lambda: Conv1D(nf=5, nx=3)], ids=["linear", "conv1d"])
def test_set_weight_oi_round_trip(make):
    torch.manual_seed(0)
    m, x = make(), torch.randn(4, 3)
    param = m.weight
    w = torch.randn(5, 3)
    A.set_weight_oi(m, w)
    assert m.weight is param  # same shape: copied in place
    torch.testing.assert_close(A.weight_oi(m), w)
    A.set_weight_oi(m, A.weight_oi(m).clone())
    torch.testing.assert_close(A.weight_oi(m), w)
    # shrinking the output (what an FF merge does to w_in) needs the new bias
    with pytest.raises(ValueError, match="bias"):
        A.set_weight_oi(m, w[:2])
    A.set_weight_oi(m, w[:2], bias=torch.ones(2))
    assert A.out_features(m) == 2 and A.in_features(m) == 3
    torch.testing.assert_close(m(x), F.linear(x, w[:2], torch.ones(2)))
    # and shrinking the input (what it does to w_out) keeps the bias
    A.set_weight_oi(m, w[:2, :1])
    assert A.in_features(m) == 1
    torch.testing.assert_close(m(x[:, :1]), F.linear(x[:, :1], w[:2, :1], torch.ones(2)))


# ---------------------------------------------------------------------------
# unsupported models and registering new ones

class _Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.o = nn.Linear(d, d)
        self.up, self.down, self.act = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.ReLU()

    def forward(self, x):
        x = x + self.o(x)
        return x + self.down(self.act(self.up(x)))


class Toy(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.config = types.SimpleNamespace(model_type="toy")
        self.body = nn.Module()
        self.body.blocks = nn.ModuleList(_Block() for _ in range(n))

    def forward(self, x):
        for b in self.body.blocks:
            x = b(x)
        return x


def test_unsupported_model_message_says_how_to_register():
    for model in (Toy(), nn.Linear(2, 2)):
        with pytest.raises(A.UnsupportedArchitectureError) as e:
            A.anatomy(model)
        assert type(model).__name__ in str(e.value) and "register(ArchSpec(" in str(e.value)
    assert issubclass(A.UnsupportedArchitectureError, ValueError)


def test_unregistered_hf_model():
    model = T.DistilBertModel(T.DistilBertConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=2, vocab_size=V))
    with pytest.raises(A.UnsupportedArchitectureError, match="DistilBertModel.*distilbert(.|\n)*register"):
        A.anatomy(model)


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(A, "_REGISTRY", dict(A._REGISTRY))


def test_register_new_architecture(registry):
    spec = A.register(A.ArchSpec(family="toy", model_types=("toy",), stacks={"layers": "blocks"},
                                 ff_in="up", ff_gate=None, ff_out="down", ff_container="", attn_out="o",
                                 ff_act="act"))
    assert "toy" in A.families()
    model = Toy()
    an = A.anatomy(model)
    stack = an.stack("layers")
    assert an.family == "toy" and stack.path == "body.blocks" and len(stack) == 3 and stack.spec is spec
    layer = stack.layer(2)
    b = model.body.blocks[2]
    assert (layer.ff.w_in, layer.ff.w_out, layer.ff.container, layer.attn_out) == (b.up, b.down, b, b.o)
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer.ff.w_out(layer.ff.hidden(x)), b.down(b.act(b.up(x))))


def test_register_rejects_model_type_of_another_family(registry):
    with pytest.raises(ValueError, match="'t5'"):
        A.register(A.ArchSpec(family="t5bis", model_types=("t5",), stacks={"layers": "x"}, ff_in="a",
                              ff_gate=None, ff_out="b", ff_container="", attn_out="c"))


def test_wrong_block_path_is_reported_with_its_children(registry):
    A.register(A.ArchSpec(family="toy", model_types=("toy",), stacks={"layers": "blocks"},
                          ff_in="fc1", ff_gate=None, ff_out="down", ff_container="", attn_out="o"))
    with pytest.raises(A.UnsupportedArchitectureError, match=r"fc1(.|\n)*'up'"):
        A.anatomy(Toy())
