"""The artifact cache: computed once per config, never reused for another config, and says why."""
import pandas as pd
import pytest

from mtlab.cache import cached_frame, config_hash, stale_note


def test_cached_frame_computes_once_and_names_what_made_an_old_table_stale(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MTLAB_CACHE", str(tmp_path))
    calls = []

    def compute(v):
        calls.append(v)
        return pd.DataFrame({"x": [v]})

    a = {"teacher": "aaa", "profile": {"steps": 10}}
    assert cached_frame("t", a, lambda: compute(1)).x[0] == 1
    assert cached_frame("t", a, lambda: compute(2)).x[0] == 1 and calls == [1]   # read back
    assert stale_note("t", a) is None
    b = {"teacher": "bbb", "profile": {"steps": 10}}                             # another teacher
    df = cached_frame("t", b, lambda: compute(3))
    assert df.x[0] == 3 and calls == [1, 3] and df.attrs["config"] == b
    out = capsys.readouterr().out
    assert "differs in teacher" in out and "not reused" in out and config_hash(b) in out


def test_report_refuses_to_start_without_its_dependencies():
    from mtlab.notebooks import ReportError, check_dependencies

    with pytest.raises(ReportError, match="no_such_package_xyz.*make venv"):
        check_dependencies(required=("papermill", "no_such_package_xyz"))
    with pytest.raises(ReportError, match="no Jupyter kernel named 'nope'"):
        check_dependencies(kernel="nope")
