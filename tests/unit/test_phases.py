"""phases.jsonl: one line per timed phase, written also when the phase raises."""

from __future__ import annotations

import pytest

from safer_dist.runtime import phases


def test_phases_are_logged_nested_and_on_error(tmp_path):
    path = tmp_path / "phases.jsonl"
    phases.open_log(path)
    try:
        with phases.phase("outer"):
            with phases.phase("inner"):
                pass
            with pytest.raises(RuntimeError), phases.phase("inner"):
                raise RuntimeError("boom")
    finally:
        phases.open_log(None)
    with phases.phase("after_close"):
        pass
    recs = phases.read(path)
    # inner phases end (and are written) before the phase around them
    assert [r["phase"] for r in recs] == ["inner", "inner", "outer"]
    outer = recs[2]
    assert all(outer["start"] <= r["start"] <= r["end"] <= outer["end"] for r in recs[:2])
    assert all(r["wall_s"] >= 0 for r in recs)
    t = phases.totals(recs)
    assert t["inner"]["count"] == 2 and t["outer"]["count"] == 1
    assert t["inner"]["wall_s"] == pytest.approx(recs[0]["wall_s"] + recs[1]["wall_s"])
    assert t["inner"]["first_start"] == recs[0]["start"] and t["inner"]["last_end"] == recs[1]["end"]


def test_a_cut_line_is_skipped(tmp_path):
    path = tmp_path / "phases.jsonl"
    path.write_text('{"phase": "a", "start": 1, "end": 2, "wall_s": 1}\n{"phase": "b", "sta')
    assert [r["phase"] for r in phases.read(path)] == ["a"]
