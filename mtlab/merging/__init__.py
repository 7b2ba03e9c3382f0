"""Merging feed-forward sublayers (Verma et al. 2025): statistics, alignment, merge + tie, search.

The entry points most callers need are importable from here: `merge_ffs`, `save_merged`,
`load_merged` (the loader a `save_merged` folder names), `merge_model`, `prune_model`."""
from .build import merge_model, prune_model, prune_windows
from .merge import load_merged, merge_ffs, save_merged
from .spec import MergeSpec, PruneSpec
from . import lowrank  # noqa: F401,E402  registers merge method permute_lowrank (after permute and vanilla)

__all__ = ["MergeSpec", "PruneSpec", "load_merged", "merge_ffs", "merge_model", "prune_model", "prune_windows",
           "save_merged"]
