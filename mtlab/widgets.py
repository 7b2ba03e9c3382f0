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

Acting on a pick: the Export button writes it through `mtlab.export.export` (and shows the Python code
that does the same), "pin for comparison" puts two picks side by side, `static_copy()` is the plot for
a rendered page (hidden in JupyterLab while the live explorer is on the page). The merge explorer
draws only the latest state of a burst of control changes (a debounce on its worker thread).
"""
from .ui.assembly import COVERED, CUSTOM, AssemblyExplorer, strategy_options
from .ui.explorer import PlotFigure, StaticCopy
from .ui.merge import MergeExplorer, MergeState

__all__ = ["AssemblyExplorer", "MergeExplorer", "MergeState", "PlotFigure", "StaticCopy", "strategy_options", "CUSTOM",
           "COVERED"]
