"""The recipe's schema: the typed (pydantic) sections of a recipe YAML file and its reading.

`load_recipe` turns a YAML file (or a dict) into a validated `Recipe`: every key is typed and
checked here before any model is loaded, unknown keys get "did you mean", and relative paths
resolve against the recipe file's folder. What can only be checked against the model (depths,
plans, merge windows, baseline depths) is `mtlab.recipe_load.check_recipe`; running a recipe is
`mtlab.recipe.run_recipe`. This module imports neither torch nor transformers (the validators that
read registries import them when they run).
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = ["Recipe", "RecipeError", "TaskSpec", "ModulesSpec", "WindowSearchSpec", "RecoverySpec", "MergeSection",
           "BaselinesSpec", "EvalSpec", "load_recipe", "explain"]


def _registered(names, known, what: str):
    """`names` when every one is registered; otherwise the error lists the unknown and the known."""
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown {what} {bad}; use some of {list(known)}")
    return names


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSpec(_Strict):
    """The data: the bundled G2P task, a file of text pairs (seq2seq), a text file (decoder-only LMs), or
    sentences for an encoder's embeddings (scored against the original model's)."""
    kind: Literal["g2p", "pairs", "text", "sentences"] = Field(
        description="g2p (bundled CMUdict), pairs (tsv/csv/jsonl), text, sentences (an encoder's embeddings)")
    path: Path | None = Field(None, description="the pairs or text file (not for g2p); sentences: one a line "
                              "(null: the bundled English corpus, data/sentences)")
    block_size: int | None = Field(64, ge=1, description="text: tokens per example; null: one example per line")
    metric: str | None = Field(None, description="pairs: a registered task metric (mtlab.tasks.metrics: bleu, chrf, "
                               "rouge, ...); null: chrf when the median target has under 4 words, else bleu")
    source_col: str | int | None = Field(None, description="pairs: the source column (header name, JSONL key or "
                                         "index); null: 'source', or the first of a header-less 2-column file")
    target_col: str | int | None = Field(None, description="pairs: the target column; null: 'target', or the second")
    max_target_len: int | None = Field(None, ge=1, description="pairs: target tokens trained on and decoded at most; "
                                       "null: 256, cut to the model's position table (e.g. BART's positions)")
    max_length: int | None = Field(None, ge=1, description="sentences: tokens per sentence at most; null: 128")
    dev_fraction: float = Field(0.05, gt=0, lt=0.5)
    test_fraction: float = Field(0.05, gt=0, lt=0.5)

    @field_validator("metric")
    @classmethod
    def _metric(cls, v):
        from .tasks.metrics import get_metric

        return None if v is None else get_metric(v).name

    @model_validator(mode="after")
    def _path_fits_kind(self):
        if self.kind == "g2p" and self.path is not None:
            raise ValueError("the g2p task is bundled: remove path (or use kind: pairs for your own file)")
        if self.kind not in ("g2p", "sentences") and self.path is None:
            raise ValueError(f"kind {self.kind!r} needs the data file, e.g. path: data/train.txt")
        pairs_only = [k for k in ("source_col", "target_col", "max_target_len") if getattr(self, k) is not None]
        if self.kind != "pairs" and pairs_only:
            raise ValueError(f"{', '.join(pairs_only)}: only for kind: pairs; remove "
                             f"{'them' if len(pairs_only) > 1 else 'it'}")
        if self.kind != "sentences" and self.max_length is not None:
            raise ValueError("max_length: only for kind: sentences (text uses block_size); remove it")
        return self


class ModulesSpec(_Strict):
    """Module training (multi-grained module replacing) and the plans assembled from the bank."""
    granularities: tuple[int, ...] = Field((2, 3, 6), description="span sizes a module replaces (each >= 2)")
    steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)
    plans: list[str] | Literal["ladders"] = Field("ladders", description="plan texts, or every registered strategy")
    screen: bool = Field(True, description="screen the whole assembly space on dev (teacher forcing)")
    screen_limit: int | None = Field(64, ge=1, description="dev examples the screen reads")

    @field_validator("granularities")
    @classmethod
    def _ks(cls, v):
        if not v or any(k < 2 for k in v):
            raise ValueError(f"each granularity is a span of >= 2 layers, got {list(v)}; e.g. granularities: [2, 3]")
        return tuple(sorted(set(v)))

    @field_validator("plans")
    @classmethod
    def _plans(cls, v):
        from .modular.plan import Plan, PlanError

        if isinstance(v, list):
            for text in v:
                try:
                    Plan.parse(text)
                except PlanError as e:
                    raise ValueError(str(e)) from None
        return v


class WindowSearchSpec(_Strict):
    sizes: tuple[int, ...] = Field((2,), description="window sizes (layers merged into one FF)")
    methods: tuple[str, ...] = Field(("permute",), description="registered merge methods")
    starts: tuple[int, ...] | None = Field(None, description="only windows starting here (null: all)")
    select_limit: int | None = Field(64, ge=1, description="dev examples each window is scored on")

    @field_validator("methods")
    @classmethod
    def _methods(cls, v):
        from .merging.methods import merge_methods

        return _registered(v, merge_methods(), "merge method(s)")


class RecoverySpec(_Strict):
    steps: int = Field(0, ge=0, description="recovery fine-tune steps per merged model (0: none)")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-4, gt=0)


class MergeSection(_Strict):
    """FF merging: explicit merge sets and/or a window search (its best window per size and method)."""
    sets: list[str] = Field(default_factory=list,
                            description="merge specs, each one model, e.g. layers:1-2@middle/permute")
    window_search: WindowSearchSpec | None = None
    align_tokens: int = Field(2000, ge=1, description="train tokens for the FF correlations")
    recovery: RecoverySpec = Field(default_factory=RecoverySpec)

    @field_validator("sets")
    @classmethod
    def _sets(cls, v):
        from .merging.methods import merge_methods
        from .merging.spec import MergeSpec

        for text in v:
            try:
                spec = MergeSpec.parse(text)
            except ValueError as e:
                raise ValueError(f"{text!r}: {e}") from None
            if spec.method not in merge_methods():
                raise ValueError(f"{text!r}: unknown method {spec.method!r}; use one of {list(merge_methods())}")
        return v

    @model_validator(mode="after")
    def _something(self):
        if not self.sets and self.window_search is None:
            raise ValueError("merge: give sets (e.g. sets: ['layers:1-2@middle/permute']) or window_search: {}")
        return self


class BaselinesSpec(_Strict):
    names: list[str] = Field(["sft"], description="registered baselines (mtlab.baselines.baselines())")
    depths: tuple[int, ...] = Field(..., description="per-stack depths the baselines are cut to")
    steps: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)

    @field_validator("names")
    @classmethod
    def _names(cls, v):
        from .baselines import baselines

        return _registered(v, baselines(), "baseline(s)")


class EvalSpec(_Strict):
    split: Literal["dev", "test"] = "test"
    limit: int | None = Field(None, ge=1, description="examples scored per model (null: the whole split)")
    batch_size: int = Field(32, ge=1)


class StudySpec(_Strict):
    """What `mtlab study` measures beyond the recipe's models: similarity tokens and speed timing."""
    cka_tokens: int = Field(2000, ge=1, description="train tokens per stack for the CKA similarity maps")
    speed_batch_sizes: tuple[int, ...] = Field((1, 16), description="batch sizes every model is timed at")
    speed_seconds: float = Field(1.0, gt=0, description="timing per model and batch size (split over rounds)")
    speed_rounds: int = Field(3, ge=1, description="interleaved timing rounds (ratios within a round)")

    @field_validator("speed_batch_sizes")
    @classmethod
    def _sizes(cls, v):
        if not v or any(b < 1 for b in v):
            raise ValueError(f"each batch size is >= 1, got {list(v)}; e.g. speed_batch_sizes: [1, 16]")
        return tuple(sorted(set(v)))


class Recipe(_Strict):
    """What to compress (model, task), how (modules, merge, baselines), and where to (output)."""
    model: str = Field(..., description="a from_pretrained folder (or hub name), or 'bundled' (the G2P teacher)")
    tokenizer: str | None = Field(None, description="tokenizer path (default: the model's folder)")
    task: TaskSpec
    output: Path = Field(..., description="folder for models/, results.csv, summary.html")
    modules: ModulesSpec | None = None
    merge: MergeSection | None = None
    baselines: BaselinesSpec | None = None
    eval: EvalSpec = Field(default_factory=EvalSpec)
    study: StudySpec = Field(default_factory=StudySpec, description="`mtlab study` only: similarity and speed")
    seed: int = 0

    @model_validator(mode="after")
    def _fits(self):
        if self.task.kind == "g2p" and self.model != "bundled":
            raise ValueError("model: the g2p task needs the bundled teacher's G2P tokenizer; set model: bundled")
        if self.model == "bundled" and self.task.kind != "g2p":
            raise ValueError("task.kind: the bundled teacher reads G2P tokens; use kind: g2p (or your own model)")
        if not (self.modules or self.merge or self.baselines):
            raise ValueError("nothing to do: add at least one of modules, merge, baselines")
        return self


class TaskOnly(_Strict):
    task: TaskSpec


# ---- reading and checking ------------------------------------------------------------------

def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys at `loc` (for 'did you mean')."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        f = model.model_fields.get(part)
        ann = getattr(f, "annotation", None)
        args = (ann,) if get_origin(ann) is None else get_args(ann)
        sub = next((a for a in args if get_origin(a) is None and isinstance(a, type) and issubclass(a, BaseModel)),
                   None)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def explain(e: ValidationError, source: str) -> RecipeError:
    lines = []
    for err in e.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            valid = _field_names(Recipe, loc)
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            msg = f"unknown key; {'did you mean ' + repr(near[0]) + '? ' if near else ''}valid keys: {', '.join(valid)}"
        elif err["type"] == "missing":
            msg = "required; add it (see examples/ for a complete recipe)"
        lines.append(f"  {where}: {msg}")
    return RecipeError(f"{source}: the recipe is not valid:\n" + "\n".join(lines))


def load_recipe(source: str | Path | dict, base: Path | None = None) -> Recipe:
    """A validated Recipe from a YAML file (or a dict); relative paths resolve against the file's folder."""
    import yaml

    if isinstance(source, dict):
        data, name, base = source, "recipe", base or Path.cwd()
    else:
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"no recipe at {path}: give a YAML file (see examples/*/recipe.yaml)")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise RecipeError(f"{path} is not valid YAML: {e}") from None
        name, base = str(path), base or path.resolve().parent
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a mapping (model: ..., task: ..., output: ...), "
                              f"got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise explain(e, name) from None
    return _resolve_paths(recipe, base)


def _resolve_paths(r: Recipe, base: Path) -> Recipe:
    def rel(p):
        return p if p is None or Path(p).is_absolute() else base / p

    model = r.model
    if model != "bundled" and (base / model).exists() and not Path(model).is_absolute():
        model = str(base / model)
    tokenizer = r.tokenizer
    if tokenizer is not None and not Path(tokenizer).is_absolute() and (base / tokenizer).exists():
        tokenizer = str(base / tokenizer)
    task = r.task.model_copy(update={"path": rel(r.task.path)})
    return r.model_copy(update={"model": model, "tokenizer": tokenizer, "task": task, "output": rel(r.output)})
