"""Rendered reports open offline: no script, stylesheet or image fetched from a CDN."""
import nbformat

from mtlab.notebooks import external_resources, render_html


def test_external_resources_finds_what_a_page_would_fetch():
    page = ('<script src="https://cdn.x/require.js"></script><link rel="stylesheet" href="//cdn.x/a.css">'
            '<style>b{background:url("http://x/i.png")}</style><a href="https://docs.x">docs</a><script src="local.js">')
    assert external_resources(page) == ["https://cdn.x/require.js", "//cdn.x/a.css", "http://x/i.png"]


def test_rendered_notebook_has_no_cdn_requests():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# Title\nInline math $x^2$ and a [link](https://example.org)."),
        nbformat.v4.new_code_cell("1 + 1", outputs=[nbformat.v4.new_output(
            "execute_result", data={"text/plain": "2"}, execution_count=1)], execution_count=1)])
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2,
                                                                             "version_minor": 0}}
    page = render_html(nb)
    assert "<html" in page and "Inline math" in page and "jp-OutputArea" in page
    assert external_resources(page) == []
    for lib in ("require.min.js", "mathjax", "embed-amd.js", "mermaid.esm"):
        assert lib not in page.lower(), f"{lib} still referenced"
