"""ipywidgets explorers of the assembly and merge-set spaces (built in `mtlab.ui`); notebooks display them.

Both explorers read precomputed tables (the screened assembly space, the similarity matrices)
and call injected functions for anything new, so they can be unit-tested by setting widget
values in Python. They never show a previous state: every read-out, plot and outline is drawn
from one snapshot of the controls, an invalid state clears the read-out (the `error` line says
why), and the merge explorer's slow scores are keyed by their exact spec, so a result that
arrives for an older state is kept for later but never displayed. With `background=True` the
merge explorer scores on a worker thread (newest request first), shows "computing..." meanwhile
and keeps the kernel free for the next control change. CSS classes (`mtlab-*`) name the parts
for browser tests.
"""
from .ui.assembly import COVERED, STRATEGIES, AssemblyExplorer
from .ui.explorer import PlotFigure
from .ui.merge import MergeExplorer, MergeState

__all__ = ["AssemblyExplorer", "MergeExplorer", "MergeState", "PlotFigure", "STRATEGIES", "COVERED"]
