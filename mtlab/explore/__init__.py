"""Exploring what one module run and one set of merges can produce: the spaces, prefix-shared
screening of every assembly, frontier search where the space is too large to screen whole,
greedy merge sets, and quality-versus-speed frontiers."""
from .frontier import frontier_plot, mark_frontiers, pareto_mask, spearman
from .screen import max_abs_diff, screen, screen_per_plan
from .mergesets import every_merge_set, greedy_merge_sets, greedy_vs_exhaustive
from .search import BudgetError, compare_to_exhaustive, frontier_search, hypervolume
from .space import AssemblySpace, CombinedSpace, MergeSpace, merge_specs, space_sizes, window_sets

__all__ = ["AssemblySpace", "CombinedSpace", "MergeSpace", "merge_specs", "space_sizes", "window_sets", "screen",
           "screen_per_plan", "max_abs_diff", "pareto_mask", "mark_frontiers", "frontier_plot", "spearman",
           "frontier_search", "compare_to_exhaustive", "hypervolume", "BudgetError", "greedy_merge_sets",
           "every_merge_set", "greedy_vs_exhaustive"]
