"""The front door (issue #24, item 7): `import mtlab` gives the study's names lazily, loads no torch,
and the README's path needs only those names."""
from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest

import mtlab


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_every_front_door_name_resolves_to_its_submodules_object():
    assert 12 <= len(mtlab.__all__) <= 22 and len(set(mtlab.__all__)) == len(mtlab.__all__)
    for name in mtlab.__all__:
        if name == "__version__":
            continue
        module, attr = mtlab._NAMES[name]
        got = getattr(mtlab, name)
        assert callable(got), name
        if module != f"mtlab.{name}":
            assert got is getattr(importlib.import_module(module), attr), name
    ns: dict = {}
    exec(f"from mtlab import {', '.join(n for n in mtlab.__all__ if n != '__version__')}", ns)
    assert set(mtlab.__all__) <= set(dir(mtlab))


def test_import_mtlab_loads_neither_torch_nor_transformers():
    out = _run("""
        import sys, mtlab
        print(sorted(m for m in ("torch", "transformers", "pandas", "pydantic") if m in sys.modules))
        print(sorted(m for m in sys.modules if m.startswith("mtlab")))
    """)
    loaded, ours = out.splitlines()
    assert loaded == "[]"
    assert ours == "['mtlab', 'mtlab.runtime']"


@pytest.mark.parametrize("first", ["function", "module"])
def test_export_is_the_function_and_mtlab_export_the_module_in_either_import_order(first):
    """`mtlab.export` is both a submodule and a front-door function: calling the module calls the
    function, so neither import order breaks the other."""
    a, b = "from mtlab import export as f", "import mtlab.export as E"
    out = _run(f"""
        {a if first == 'function' else b}
        {b if first == 'function' else a}
        import inspect, mtlab
        print(inspect.ismodule(E), callable(f), hasattr(E, "export_config"), mtlab.export is E)
        E.export = lambda *args, **kw: ("called", args, kw)
        print(f(1, "out", task=None))
    """)
    assert out.splitlines() == ["True True True True", "('called', (1, 'out'), {'task': None})"]


def test_unknown_names_say_where_the_rest_lives():
    with pytest.raises(AttributeError, match="front door has .*apply.*mtlab.modular"):
        mtlab.no_such_name  # noqa: B018
    assert not hasattr(mtlab, "no_such_name")
