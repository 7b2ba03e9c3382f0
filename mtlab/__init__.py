"""mtlab: flexible compression of pretrained Transformers (modular assembly, FF merging).

The front door: the names a compression study needs, importable from `mtlab` itself.

    from mtlab import load_teacher, train_modules, ReplacingConfig, assemble, export

    specs       Plan ("e=1122 d=33"), MergeSpec ("encoder:3-5@middle/permute"), PruneSpec
                ("prune decoder:3-5"), CompressionSpec (a plan, then merges and prunings)
    build       apply (any spec -> a compressed copy), Candidate (a model with its spec and budget),
                assemble (a plan from a module bank)
    train       ReplacingConfig, TrainConfig, train_modules (one module run), recover (a fine-tune)
    analyse     cka_matrix (layer x layer similarity), window_search (FF merge windows),
                screen (every assembly, teacher-forced), frontier_search (too many to screen)
    data        load_teacher (the bundled G2P teacher and task), load_model_and_data (your model
                folder and data file, checked as a recipe's are)
    run         run_recipe (`mtlab run recipe.yaml`: everything a recipe lists), study (`mtlab study
                recipe.yaml`: the report's four tables for your model), export (a folder plain
                transformers loads, checked by reloading)

Each name is imported on first use (PEP 562), so `import mtlab` stays cheap: it loads neither
torch nor transformers, and no submodule import can cycle back through this file. The rest of
the library lives in the submodules (`mtlab.modular`, `mtlab.merging`, `mtlab.explore`, ...).
"""
# First, before anything can load torch: threads and OpenMP settings (MTLAB_THREADS; mtlab/runtime.py)
import sys as _sys
import types as _types
from importlib import import_module as _import_module

from . import runtime as _runtime

_runtime.configure()

from importlib.metadata import PackageNotFoundError as _NotInstalled, version as _version  # noqa: E402

try:
    __version__ = _version("mtlab")
except _NotInstalled:  # a source checkout that was never installed
    __version__ = "0+unknown"

#: front-door name -> (submodule, attribute) it is read from on first use
_NAMES = {
    "Plan": ("mtlab.modular.plan", "Plan"),
    "MergeSpec": ("mtlab.merging.spec", "MergeSpec"),
    "PruneSpec": ("mtlab.merging.spec", "PruneSpec"),
    "CompressionSpec": ("mtlab.candidate", "CompressionSpec"),
    "apply": ("mtlab.candidate", "apply"),
    "Candidate": ("mtlab.candidate", "Candidate"),
    "assemble": ("mtlab.modular.bank", "assemble"),
    "ReplacingConfig": ("mtlab.modular.replacing", "ReplacingConfig"),
    "TrainConfig": ("mtlab.train", "TrainConfig"),
    "train_modules": ("mtlab.modular.replacing", "train_modules"),
    "recover": ("mtlab.merging.recover", "recover"),
    "cka_matrix": ("mtlab.similarity", "cka_matrix"),
    "window_search": ("mtlab.merging.windows", "window_search"),
    "screen": ("mtlab.explore.screen", "screen"),
    "frontier_search": ("mtlab.explore.search", "frontier_search"),
    "load_teacher": ("mtlab.teacher", "load_teacher"),
    "load_model_and_data": ("mtlab.recipe_load", "load_model_and_data"),
    "run_recipe": ("mtlab.recipe", "run_recipe"),
    "export": ("mtlab.export", "export"),
    "study": ("mtlab.study", "study"),
}

__all__ = list(_NAMES) + ["__version__"]


class _CallableModule(_types.ModuleType):
    """A submodule that shares its name with its front-door function (`mtlab.export`): calling the
    module calls the function, so `from mtlab import export; export(model, "out")` works whichever of
    `mtlab.export` (module) and `export` (function) was imported first, and `import mtlab.export as E`
    still gives the module."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


class _FrontDoor(_types.ModuleType):
    """The `mtlab` package: when the import system binds a submodule whose name is a front-door
    function (`mtlab.export`), that submodule is made callable (`_CallableModule`)."""

    def __setattr__(self, name, value):
        if (isinstance(value, _types.ModuleType) and _NAMES.get(name, ("",))[0] == f"{__name__}.{name}"
                and type(value) is _types.ModuleType):
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _FrontDoor


def __getattr__(name: str):
    """A front-door name, imported on first use and kept (PEP 562)."""
    if name not in _NAMES:
        raise AttributeError(f"module 'mtlab' has no attribute {name!r}; the front door has {', '.join(__all__)} "
                             "(the rest is in the submodules, e.g. mtlab.modular, mtlab.merging, mtlab.explore)")
    module, attr = _NAMES[name]
    mod = _import_module(module)
    if module == f"{__name__}.{name}":  # the submodule of the same name, made callable when it was bound
        return _sys.modules[__name__].__dict__[name]
    value = getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(__all__) | {k for k in globals() if not k.startswith("_")} | {"__version__"})
