"""Architecture registry: the one place in mtlab that knows model internals.

Everything else in mtlab (layer replacement, FF merging, measurement) asks
`anatomy(model)` where the transformer blocks, their feed-forward (FF)
sublayers and their attention output projections are, and never spells a
Hugging Face attribute name itself. Supporting a new architecture is one
`register(ArchSpec(...))` call, in the spirit of mergekit's architecture
definitions.

An FF sublayer is described by three projections, with one convention for
every family:

    plain FF:  y = w_out(act(w_in(x)))
    GLU FF:    y = w_out(act(w_gate(x)) * w_in(x))

so `w_gate` is always the branch that goes through the activation (Llama's
`gate_proj`) and `w_in` the purely linear branch (Llama's `up_proj`). In HF's
gated T5 (`T5DenseGatedActDense`) the activated branch is `wi_0` and the
linear one `wi_1`, hence w_gate = wi_0 and w_in = wi_1; the ReLU T5
(`T5DenseActDense`) has a single `wi` = w_in. For merging, the rows of w_in
and w_gate (and the columns of w_out) are permuted together, so the
distinction matters only when recomputing activations.

Projections are `nn.Linear` (weight stored (out, in)) or GPT-2's
`transformers.pytorch_utils.Conv1D` (weight stored (in, out)); the weight
helpers at the bottom hide the difference, dispatching on the module's type.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

DottedPath = str | tuple[str, ...]
FF_ROLES = ("w_in", "w_gate", "w_out")  # the projections of an FF sublayer, in this order  # a dotted path, or alternatives tried in order


class UnsupportedArchitectureError(ValueError):
    """The model's architecture is not (or not correctly) described in the registry."""


# ---------------------------------------------------------------------------
# What anatomy() returns

@dataclass
class FF:
    """One feed-forward sublayer (see the module docstring for the convention).

    `container` is the module whose forward computes the FF sublayer: the MLP
    module where the architecture has one (T5 DenseReluDense, GPT-2 mlp,
    Llama mlp, ViT 5.x mlp). BART-like and BERT-like blocks keep fc1/fc2
    (resp. intermediate/output) directly in the block, so there `container`
    is the whole block and its forward also runs attention.
    `act` is the activation module, when the architecture exposes one.
    """
    w_in: nn.Module
    w_gate: nn.Module | None
    w_out: nn.Module
    container: nn.Module
    act: nn.Module | None = None

    @property
    def gated(self) -> bool:
        return self.w_gate is not None

    def params(self) -> list[nn.Parameter]:
        """Weights and biases of w_in, w_gate, w_out, each parameter once."""
        seen: dict[int, nn.Parameter] = {}
        for m in (self.w_in, self.w_gate, self.w_out):
            if m is not None:
                for p in m.parameters():
                    seen.setdefault(id(p), p)
        return list(seen.values())

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The intermediate activations (the input of w_out) for input x."""
        if self.act is None:
            raise ValueError("this FF has no activation module registered (ArchSpec.ff_act)")
        if self.w_gate is None:
            return self.act(self.w_in(x))
        return self.act(self.w_gate(x)) * self.w_in(x)


@dataclass
class Layer:
    """One transformer block of a stack."""
    index: int
    block: nn.Module
    ff: FF
    attn_out: nn.Module  # output projection of the block's *self*-attention


@dataclass
class Stack:
    """A sequence of blocks: "encoder", "decoder", or "layers" (single-stack model)."""
    name: str
    path: str  # dotted path of the ModuleList from the model root, e.g. "bert.encoder.layer"
    layers: nn.ModuleList
    spec: ArchSpec = field(repr=False)

    def __len__(self) -> int:
        return len(self.layers)

    def layer(self, i: int) -> Layer:
        """Layer i (negative indices count from the end), resolved fresh from the block,
        so it reflects any module replacement done since."""
        n = len(self.layers)
        if not -n <= i < n:
            raise IndexError(f"{self.name} has {n} layers: index {i} not in [0, {n - 1}] (or [-{n}, -1])")
        i %= n
        return self.spec.layer(i, self.layers[i], where=f"{self.path}.{i}")

    def __iter__(self) -> Iterator[Layer]:
        return (self.layer(i) for i in range(len(self)))


@dataclass
class Anatomy:
    family: str
    model: nn.Module = field(repr=False)
    stacks: dict[str, Stack]  # encoder before decoder

    def stack(self, name: str) -> Stack:
        try:
            return self.stacks[name]
        except KeyError:
            raise KeyError(f"{type(self.model).__name__} ({self.family}) has no stack {name!r}; "
                           f"valid: {list(self.stacks)}") from None


# ---------------------------------------------------------------------------
# The registry

@dataclass(frozen=True)
class ArchSpec:
    """How one architecture is laid out.

    `stacks` maps a stack name to the dotted path of its nn.ModuleList. Task
    heads and wrappers put the base model under a prefix (BertModel has
    `encoder.layer`, BertForX has `bert.encoder.layer`), so the path is
    matched as a suffix of the module names, shortest match first. Stacks
    that a model lacks are skipped (T5EncoderModel has no decoder).

    The other paths are relative to one block; integer parts index
    ModuleLists and may be negative ("layer.-1" is T5's FF sublayer, which is
    layer[1] in the encoder but layer[2] in the decoder); "" is the block
    itself. A tuple lists alternatives, tried in order (T5 "wi" vs "wi_1",
    or two transformers versions). `ff_gate` and `ff_act` may be missing in a
    block; the others must resolve.
    """
    family: str
    model_types: tuple[str, ...]
    stacks: dict[str, DottedPath]
    ff_in: DottedPath
    ff_gate: DottedPath | None
    ff_out: DottedPath
    ff_container: DottedPath
    attn_out: DottedPath
    ff_act: DottedPath | None = None
    # config attribute holding each stack's depth, updated when a stack is re-tiled
    layer_counts: dict[str, str] = field(default_factory=lambda: {"layers": "num_hidden_layers"})

    def layer(self, index: int, block: nn.Module, where: str = "block") -> Layer:
        """Resolve this spec's paths in one block (`where` names it in errors)."""
        def need(attr: str) -> nn.Module:
            return _resolve(block, getattr(self, attr), what=f"{attr} of {where}", family=self.family)

        def maybe(path: DottedPath | None) -> nn.Module | None:
            return None if path is None else _try_resolve(block, path)

        ff = FF(w_in=need("ff_in"), w_gate=maybe(self.ff_gate), w_out=need("ff_out"),
                container=need("ff_container"), act=maybe(self.ff_act))
        return Layer(index=index, block=block, ff=ff, attn_out=need("attn_out"))


_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    """Add (or replace, by family) an architecture. A model_type may belong to one family only."""
    for other in _REGISTRY.values():
        clash = set(other.model_types) & set(spec.model_types)
        if other.family != spec.family and clash:
            raise ValueError(f"model_type(s) {sorted(clash)} already registered by family {other.family!r}")
    _REGISTRY[spec.family] = spec
    return spec


def families() -> list[str]:
    return list(_REGISTRY)


def anatomy(model: nn.Module) -> Anatomy:
    """Find the stacks, blocks and FF/attention projections of a model."""
    cls = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = next((s for s in _REGISTRY.values() if model_type in s.model_types), None)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"{cls} (config.model_type={model_type!r}) is not in the mtlab architecture registry "
            f"(families: {', '.join(families())}). To support it, register its layout, e.g.\n"
            "    from mtlab.anatomy import ArchSpec, register\n"
            "    register(ArchSpec(family='mymodel', model_types=('mymodel',),\n"
            "        stacks={'layers': 'model.layers'}, ff_in='mlp.up_proj', ff_gate='mlp.gate_proj',\n"
            "        ff_out='mlp.down_proj', ff_container='mlp', attn_out='self_attn.o_proj', ff_act='mlp.act_fn'))")
    names = {m: n for n, m in model.named_modules(remove_duplicate=False)}
    stacks = {}
    for name, path in spec.stacks.items():
        found = _find_modulelist(model, path)
        if found is not None:
            stacks[name] = Stack(name=name, path=names.get(found, str(path)), layers=found, spec=spec)
    if not stacks:
        raise UnsupportedArchitectureError(
            f"{cls} is registered as family {spec.family!r}, but none of its stack paths "
            f"{dict(spec.stacks)} names an nn.ModuleList in it; the layout may have changed in this "
            "transformers version: fix it with mtlab.anatomy.register(ArchSpec(...))")
    anat = Anatomy(family=spec.family, model=model, stacks=stacks)
    for s in stacks.values():  # fail now, with the path, rather than later in a merge
        if len(s):
            s.layer(0)
    return anat


def set_stack_layers(model: nn.Module, stack: str, blocks: list[nn.Module], *, update_config: bool = True) -> None:
    """Replace a stack's blocks (e.g. by an assembly of original layers and modules).

    Installs a new nn.ModuleList at the stack's path, renumbers `layer_idx` (HF's
    KV-cache slot) on every submodule that has one, and, unless update_config is
    False (a transient swap during training), writes the new depth to the config
    attribute named by the registry so save_pretrained/from_pretrained round-trips.
    """
    ana = anatomy(model)
    st = ana.stack(stack)
    if not blocks:
        raise ValueError(f"{stack}: a stack needs at least one block")
    parent_path, _, attr = st.path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, nn.ModuleList(blocks))
    if update_config:
        for i, block in enumerate(blocks):
            for m in block.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = i
        key = st.spec.layer_counts.get(stack)
        if key is None:
            raise UnsupportedArchitectureError(f"{ana.family}: no config attribute registered for the depth of "
                                               f"stack {stack!r}; add it to ArchSpec.layer_counts")
        setattr(model.config, key, len(blocks))
        depths = {name: len(blocks) if name == stack else len(other) for name, other in ana.stacks.items()}
        sync_cache_depth(model, depths.get("decoder"))


def sync_cache_depth(model: nn.Module, decoder_depth: int | None = None) -> None:
    """Make the decoder depth that transformers reads to size its default KV cache match the model's
    decoder stack (in place, on `model.config`; saved with it, so a plain reload is right too).

    transformers 5.x sizes the cache of `generate()` from `config.get_text_config(decoder=True)
    .num_hidden_layers`, which for a flat T5 config is `num_layers`, the ENCODER's depth: a T5 whose
    decoder is deeper than its encoder fails in plain `generate()` with an IndexError. transformers
    maps a flat config's `decoder_layers` to the decoder's `num_hidden_layers`, so that key is set
    when the two differ. Models without a decoder stack are left alone (`decoder_depth`: the decoder's
    blocks, when the caller knows it). Called by `set_stack_layers`, the one primitive every permanent
    change of a stack's depth goes through."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or not hasattr(config, "get_text_config"):
        return
    if decoder_depth is None:
        stacks = anatomy(model).stacks
        if "decoder" not in stacks:
            return
        decoder_depth = len(stacks["decoder"])
    depth = decoder_depth
    if config.get_text_config(decoder=True).num_hidden_layers != depth:
        config.decoder_layers = depth
        got = config.get_text_config(decoder=True).num_hidden_layers
        if got != depth:
            raise UnsupportedArchitectureError(
                f"{type(config).__name__}: transformers reads a decoder depth of {got} from the config, but the "
                f"decoder has {depth} blocks, and `decoder_layers` does not fix it in this transformers version; "
                "generate with **mtlab.tasks.base.cache_kwargs(model)")


# ---------------------------------------------------------------------------
# Path resolution

def _alternatives(path: DottedPath) -> tuple[str, ...]:
    return (path,) if isinstance(path, str) else tuple(path)


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split(".") if dotted else ():
        if part.lstrip("-").isdigit():
            module = module[int(part)]  # ModuleList / Sequential, negative allowed
        else:
            module = getattr(module, part)
    if not isinstance(module, nn.Module):
        raise AttributeError(f"{dotted!r} is a {type(module).__name__}, not a module")
    return module


def _try_resolve(root: nn.Module, path: DottedPath) -> nn.Module | None:
    for p in _alternatives(path):
        try:
            return _get(root, p)
        except (AttributeError, IndexError, TypeError):
            continue
    return None


def _resolve(root: nn.Module, path: DottedPath, what: str, family: str) -> nn.Module:
    found = _try_resolve(root, path)
    if found is None:
        children = [n for n, _ in root.named_children()]
        raise UnsupportedArchitectureError(
            f"{family}: {what} ({type(root).__name__}) has no module at {path!r}; its children are "
            f"{children}. The layout may differ in this transformers version: fix it with "
            "mtlab.anatomy.register(ArchSpec(...))")
    return found


def _find_modulelist(model: nn.Module, path: DottedPath) -> nn.ModuleList | None:
    """The ModuleList whose full name is `path` or ends with '.' + path; the shortest
    such name wins, so a prefix added by a task head or a wrapper does not matter."""
    for p in _alternatives(path):
        hits = [(n, m) for n, m in model.named_modules()
                if isinstance(m, nn.ModuleList) and (n == p or n.endswith("." + p))]
        if hits:
            return min(hits, key=lambda h: h[0].count("."))[1]
    return None


# ---------------------------------------------------------------------------
# Weight helpers, orientation-agnostic: (out_features, in_features) everywhere

def _check(module: nn.Module) -> None:
    if not isinstance(module, (nn.Linear, Conv1D)):
        raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


def weight_oi(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features): the parameter itself for Linear,
    its transposed view for Conv1D (in-place edits reach the module either way)."""
    _check(module)
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def out_features(module: nn.Module) -> int:
    _check(module)
    return module.nf if isinstance(module, Conv1D) else module.out_features


def in_features(module: nn.Module) -> int:
    _check(module)
    return module.nx if isinstance(module, Conv1D) else module.in_features


def set_weight_oi(module: nn.Module, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Write an (out, in) weight (and optionally the bias) in the module's own orientation.

    Same shape: copied in place, so the Parameter object (optimizer state, ties)
    survives. New shape (e.g. a merged, narrower FF): new Parameters, and the
    module's size attributes are updated; if the module has a bias and the
    output size changes, the new bias must be given.
    """
    _check(module)
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    old = module.weight
    stored = w.T if isinstance(module, Conv1D) else w
    with torch.no_grad():
        if stored.shape == old.shape:
            old.copy_(stored)
        else:
            if module.bias is not None and bias is None and w.shape[0] != out_features(module):
                raise ValueError(f"output size changes {out_features(module)} -> {w.shape[0]}: pass the new bias")
            module.weight = nn.Parameter(stored.detach().to(old).contiguous(), requires_grad=old.requires_grad)
            if isinstance(module, Conv1D):
                module.nx, module.nf = w.shape[1], w.shape[0]
            else:
                module.in_features, module.out_features = w.shape[1], w.shape[0]
        if bias is not None:
            if module.bias is None:
                raise ValueError(f"{type(module).__name__} has no bias to set")
            if bias.shape == module.bias.shape:
                module.bias.copy_(bias)
            else:
                module.bias = nn.Parameter(bias.detach().to(module.bias).contiguous(),
                                           requires_grad=module.bias.requires_grad)
    if module.bias is not None and module.bias.shape[0] != out_features(module):
        raise ValueError(f"bias has {module.bias.shape[0]} entries for {out_features(module)} outputs")


# ---------------------------------------------------------------------------
# Registered architectures (module names checked against transformers 5.23)

_T5_FF = "layer.-1.DenseReluDense"
register(ArchSpec(
    family="t5", model_types=("t5", "mt5"),
    stacks={"encoder": "encoder.block", "decoder": "decoder.block"},
    ff_in=(f"{_T5_FF}.wi", f"{_T5_FF}.wi_1"),  # ReLU T5: wi; gated: wi_1 is the linear branch
    ff_gate=f"{_T5_FF}.wi_0",                  # gated only: act(wi_0(x)) * wi_1(x)
    ff_out=f"{_T5_FF}.wo", ff_container=_T5_FF, ff_act=f"{_T5_FF}.act",
    attn_out="layer.0.SelfAttention.o",
    layer_counts={"encoder": "num_layers", "decoder": "num_decoder_layers"}))

for _family in ("bart", "marian", "mbart"):  # fc1/fc2 live directly in the block
    register(ArchSpec(
        family=_family, model_types=(_family,),
        stacks={"encoder": "encoder.layers", "decoder": "decoder.layers"},
        ff_in="fc1", ff_gate=None, ff_out="fc2", ff_container="", ff_act="activation_fn",
        attn_out="self_attn.out_proj",
        layer_counts={"encoder": "encoder_layers", "decoder": "decoder_layers"}))

register(ArchSpec(
    family="gpt2", model_types=("gpt2",),
    stacks={"layers": "h"},
    ff_in="mlp.c_fc", ff_gate=None, ff_out="mlp.c_proj", ff_container="mlp", ff_act="mlp.act",
    attn_out="attn.c_proj", layer_counts={"layers": "n_layer"}))

register(ArchSpec(  # also MiniLM, which is a BERT; RoBERTa shares the layout
    family="bert", model_types=("bert", "roberta"),
    stacks={"layers": "encoder.layer"},
    ff_in="intermediate.dense", ff_gate=None, ff_out="output.dense", ff_container="",
    ff_act="intermediate.intermediate_act_fn", attn_out="attention.output.dense"))

register(ArchSpec(  # transformers 5.x: layers / mlp.fc1 / attention.o_proj; 4.x: BERT-like names
    family="vit", model_types=("vit",),
    stacks={"layers": ("layers", "encoder.layer")},
    ff_in=("mlp.fc1", "intermediate.dense"), ff_gate=None, ff_out=("mlp.fc2", "output.dense"),
    ff_container=("mlp", ""), ff_act=("mlp.activation_fn", "intermediate.intermediate_act_fn"),
    attn_out=("attention.o_proj", "attention.output.dense")))

for _family in ("llama", "mistral", "qwen2"):  # down(act(gate(x)) * up(x))
    register(ArchSpec(
        family=_family, model_types=(_family,),
        stacks={"layers": "layers"},
        ff_in="mlp.up_proj", ff_gate="mlp.gate_proj", ff_out="mlp.down_proj", ff_container="mlp",
        ff_act="mlp.act_fn", attn_out="self_attn.o_proj"))
