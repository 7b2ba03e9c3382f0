"""Exploring what one module run and one set of merges can produce: the spaces, prefix-shared
screening of every assembly, and quality-versus-speed frontiers."""
from .frontier import frontier_plot, mark_frontiers, pareto_mask, spearman
from .screen import max_abs_diff, screen, screen_per_plan
from .space import AssemblySpace, CombinedSpace, MergeSpace, merge_specs, space_sizes, window_sets

__all__ = ["AssemblySpace", "CombinedSpace", "MergeSpace", "merge_specs", "space_sizes", "window_sets", "screen",
           "screen_per_plan", "max_abs_diff", "pareto_mask", "mark_frontiers", "frontier_plot", "spearman"]
