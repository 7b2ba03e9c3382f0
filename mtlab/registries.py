"""Every registry where users extend mtlab, in one place (each a `mtlab.registry.Registry`): what a
study, an explorer, the CLI's help and a recipe's validation list instead of hard-coded names."""
from __future__ import annotations

from .baselines import BASELINES
from .merging.methods import METHODS
from .modular.plan import STRATEGIES
from .registry import Registry
from .tasks.kinds import TASKS
from .tasks.metrics import METRICS

__all__ = ["BASELINES", "METHODS", "METRICS", "STRATEGIES", "TASKS", "registries", "registered_text"]


def registries() -> dict[str, Registry]:
    """{title: registry}: merge methods, baselines, assembly strategies, task kinds, task metrics."""
    return {"merge methods": METHODS, "baselines": BASELINES, "assembly strategies": STRATEGIES,
            "task kinds": TASKS, "task metrics": METRICS}


def registered_text(width: int = 100) -> str:
    """One line per registry naming its entries by rank (for `mtlab --help`), and how to add one."""
    import textwrap

    lines = ["registered (extend any with one decorated function; see mtlab.registry):"]
    for title, reg in registries().items():
        names = ", ".join(reg.names(by_rank=True)) or "(none)"
        lines += textwrap.wrap(f"{title}: {names}", width, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines)
