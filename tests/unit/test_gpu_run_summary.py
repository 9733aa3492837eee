"""bench/gpu_run.py's phase table: per-phase wall time, GPU utilisation and peak memory from
phases.jsonl windows and GPU samples, and the busy share of the training span (by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
gpu_run = pytest.importorskip("gpu_run")


def _phase(name, start, end):
    return {"phase": name, "start": start, "end": end, "wall_s": end - start}


def test_summary_by_hand():
    phases = [
        _phase("sft_setup", 0.0, 10.0),
        _phase("sft", 10.0, 20.0),
        _phase("erpo_sample", 20.0, 24.0),
        _phase("erpo_dpo", 24.0, 25.0),
        _phase("erpo_sample", 26.0, 28.0),
        _phase("erpo_dpo", 28.0, 30.0),
        _phase("custom", 40.0, 41.0),
    ]
    # (time, utilisation %, memory MiB)
    samples = [(5.0, 0, 1024), (12.0, 100, 20480), (18.0, 80, 30720), (22.0, 10, 40960), (24.5, 90, 35840),
               (25.5, 0, 35840), (27.0, 30, 38912), (29.0, 100, 36864), (35.0, 0, 1024)]
    s = gpu_run.summarize(phases, samples)
    rows = {r["phase"]: r for r in s["rows"]}
    # the run's order first, unknown names last
    assert [r["phase"] for r in s["rows"]] == ["sft_setup", "sft", "erpo_sample", "erpo_dpo", "custom"]
    assert rows["sft"] == {"phase": "sft", "count": 1, "wall_s": 10.0, "gpu_util": 0.9, "peak_mem_gib": 30.0}
    # erpo_sample: samples at 22 (10%) and 27 (30%) -> 20%; peak 40960 MiB = 40 GiB
    assert rows["erpo_sample"]["count"] == 2 and rows["erpo_sample"]["wall_s"] == 6.0
    assert rows["erpo_sample"]["gpu_util"] == pytest.approx(0.2) and rows["erpo_sample"]["peak_mem_gib"] == 40.0
    # erpo_dpo: 24.5 (90%) and 29 (100%) -> 95%; 25.5 lies between its windows
    assert rows["erpo_dpo"]["gpu_util"] == pytest.approx(0.95) and rows["erpo_dpo"]["peak_mem_gib"] == 36.0
    assert rows["custom"]["gpu_util"] is None and rows["custom"]["peak_mem_gib"] is None
    # busy span 10 .. 30: samples at 12, 18, 22, 24.5, 25.5, 27, 29 -> (100+80+10+90+0+30+100)/7 %
    assert s["busy"]["seconds"] == 20.0 and s["busy"]["samples"] == 7
    assert s["busy"]["share"] == pytest.approx(410 / 7 / 100, abs=1e-4)
    table = gpu_run.format_table(s)
    assert "below the 80% target" in table and "58.6%" in table


def test_summary_without_samples_or_erpo():
    s = gpu_run.summarize([_phase("sft", 0.0, 1.0)], [])
    assert s["busy"] is None and s["rows"][0]["gpu_util"] is None
    assert "no SFT or no ERPO phase" in gpu_run.format_table(s)
    s = gpu_run.summarize([_phase("sft", 0.0, 1.0), _phase("erpo_dpo", 1.0, 2.0)], [])
    assert s["busy"]["share"] is None and "not measured" in gpu_run.format_table(s)
    # no step-DPO step (no pairs): the span ends with the last ERPO phase, setup excluded
    s = gpu_run.summarize([_phase("sft", 0.0, 1.0), _phase("erpo_setup", 1.0, 2.0), _phase("erpo_sample", 2.0, 3.0),
                           _phase("erpo_judge", 3.0, 3.5), _phase("eval_erpo", 4.0, 9.0)], [(3.2, 50, 1024)])
    assert s["busy"]["seconds"] == 3.5 and s["busy"]["share"] == 0.5
