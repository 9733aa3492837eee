"""`safer run` with ``eval.base=true`` and ``eval.attacks``: the model before SFT is evaluated on
the same held-out prompts first, and ``report.md`` puts its numbers beside the SFT model's."""

from __future__ import annotations

import json
import re

from safer_dist.evaluation.evaluate import summarize_by_attack
from safer_dist.evaluation.report import ROWS, _fmt
from tests.e2e.test_cli_erpo import _args, safer


def _table(report: str) -> dict[str, list[str]]:
    """The first markdown table of the report: label -> cells."""
    rows = {}
    for line in report.split("## ")[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) > 1:
            rows[cells[0]] = cells[1:]
    return rows


def test_run_reports_the_base_model_beside_sft(tmp_path):
    p = safer("run", *_args(tmp_path), "eval.base=true", "eval.attacks=roleplay", "eval.max_prompts=12",
              "eval.max_new_tokens=48", "erpo.iterations=0", "train.max_steps=6", "train.lr=5e-3",
              "train.warmup_steps=1", "checkpoint.every_steps=0")
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "r"
    summaries = json.loads((run / "eval" / "summary.json").read_text())
    assert list(summaries) == ["base", "sft"]
    # The base column is model.path, the model SFT started from (created by model.init_preset).
    assert summaries["base"]["model"] == str(tmp_path / "model")
    assert summaries["sft"]["model"] == str(run / "hf")
    rows = {tag: [json.loads(x) for x in (run / "eval" / f"{tag}.jsonl").read_text().splitlines()]
            for tag in ("base", "sft")}
    # The same prompts (12 as written + a roleplay copy of each harmful one) for both models...
    assert [r["id"] for r in rows["base"]] == [r["id"] for r in rows["sft"]]
    num_harmful = sum(r["harmful"] for r in rows["base"] if r["attack"] == "none")
    assert len(rows["base"]) == 12 + num_harmful and num_harmful > 0
    # ...answered by two different models.
    assert [r["output"] for r in rows["base"]] != [r["output"] for r in rows["sft"]]

    table = _table((run / "report.md").read_text())
    assert table["metric"] == ["base", "sft"]
    for tag, col in (("base", 0), ("sft", 1)):
        expected, _ = summarize_by_attack(rows[tag])
        assert expected["num_prompts"] == 12 and "jailbreak_success_rate" in expected
        for key, label, pct in ROWS:
            assert table[label][col] == _fmt(key, expected[key], pct), (tag, label)
        assert table["prompts"][col] == "12"
    assert re.search(r"^\| roleplay \| [\d.]+% \| [\d.]+% \|$", (run / "report.md").read_text(), re.M)
    assert re.search(r"^held-out metric\s+base\s+sft$", p.stdout, re.M), p.stdout[-2000:]


def test_a_stop_during_evaluation_exits_75_at_once_and_writes_nothing(tmp_path):
    """SIGTERM while `safer run` evaluates the base model (the first phase; before it ran with
    Ray's own SIGTERM handler, which killed the driver mid-call): the rollout call in flight is
    dropped within a second or two, nothing of the evaluation is written, the job exits 75 (what
    the SLURM script requeues on) and leaves no process behind."""
    import signal
    import time

    from tests.e2e.jobctl import assert_session_gone, reap_all, start_job, wait_for

    log = tmp_path / "run.log"
    # all 300 held-out prompts, the untrained model writing to the token limit: minutes of work
    job = start_job(["run", *_args(tmp_path), "eval.base=true", "eval.max_new_tokens=200"], log)
    try:
        wait_for(lambda: "evaluating 300 prompts" in log.read_text(), 240, "the base evaluation", job, log)
        t = time.monotonic()
        job.send_signal(signal.SIGTERM)
        rc = job.wait(timeout=60)
        stopped_s = time.monotonic() - t
        text = log.read_text()
        assert rc == 75, text[-3000:]
        assert stopped_s < 15, stopped_s  # not the 120 s grace period
        assert "stopped during generate on the rollout workers" in text, text[-3000:]
        assert not (tmp_path / "r" / "eval" / "base.jsonl").exists()
        assert not (tmp_path / "r" / "eval" / "summary.json").exists()
        assert_session_gone(job.pid)
    finally:
        reap_all()
