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


# ---- the README's front page and the docs pages ---------------------------------------------------

import ast  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_is_a_front_page_and_keeps_the_test_command():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    assert any(line.split("#")[0].strip() == "make test" for b in _blocks(text, "bash") for line in b.splitlines())
    assert "make test" in (ROOT / ".ci" / "run").read_text()  # CI runs the README's test command


def test_the_readmes_python_path_uses_only_the_front_door_in_at_most_five_imports():
    imports = [n for b in _blocks(README.read_text(), "python") for n in ast.walk(ast.parse(b))
               if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert 1 <= len(imports) <= 5
    for n in imports:
        if isinstance(n, ast.Import):
            assert [a.name for a in n.names] == ["mtlab"], ast.unparse(n)
        else:
            assert n.module == "mtlab" and n.level == 0, ast.unparse(n)
            assert {a.name for a in n.names} <= set(mtlab.__all__), ast.unparse(n)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", h).replace(" ", "-")


def test_every_relative_link_in_the_readme_and_docs_resolves():
    bad = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # links in code are not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md":
                heads = {_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)}
                if anchor not in heads:
                    bad.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, "\n".join(bad)
    linked = set(re.findall(r"\]\(docs/([\w.]+\.md)\)", README.read_text()))
    assert {p.name for p in PAGES[1:]} <= linked  # the README links every docs page


def test_docs_cli_lists_every_command():
    import argparse

    from mtlab.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = (ROOT / "docs" / "cli.md").read_text()
    assert [c for c in sub.choices if f"`mtlab {c}" not in text] == []


TINY = [(r"\bsteps=\d+", "steps=2"), (r"\bwarmup=\d+", "warmup=1"), (r"\bmax_tokens=\d+", "max_tokens=300"),
        (r"\balign_tokens=\d+", "align_tokens=300"), (r"\bselect_limit=\d+", "select_limit=8"),
        (r"\blimit=\d+", "limit=8")]


@pytest.mark.slow
def test_the_readmes_python_path_runs_on_the_bundled_teacher(tmp_path, monkeypatch):
    """The README's block, budgets cut to a few steps and words, end to end in a fresh folder."""
    code = "\n".join(_blocks(README.read_text(), "python"))
    assert "load_teacher()" in code
    for pattern, tiny in TINY:
        code, n = re.subn(pattern, tiny, code)
        assert n, pattern  # the budget knobs the README shows are the ones cut here
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    from transformers import T5ForConditionalGeneration

    assert (tmp_path / "out" / "small" / "config.json").is_file()
    reloaded = T5ForConditionalGeneration.from_pretrained(tmp_path / "out" / "small")
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in ns["small"].parameters())
    assert len(ns["screened"]) > 1 and set(ns["cka"].shape) == {12}  # every assembly; 6+6 FF outputs
    assert ns["search"].best.any() and str(ns["spec"]).endswith("/permute")
