"""metrics.jsonl rows get a wall-clock time and fan out to TensorBoard and W&B (offline),
read back with TensorBoard's own EventAccumulator and from W&B's run file."""

from __future__ import annotations

import time

import pytest

from safer_dist.config import ConfigError, TrackSection, load_config
from safer_dist.runtime import tracking
from safer_dist.runtime.metrics import MetricsWriter, read_metrics
from tests.checks import tensorboard_scalars, wandb_history, wandb_records

ROWS = [
    {"stage": "sft", "step": 1, "loss": 2.5, "lr": 1e-3, "truncated": 0},
    {"stage": "sft", "step": 2, "loss": 2.0, "lr": 2e-3, "truncated": 1, "valid_loss": 2.25},
    {"stage": "erpo_iter", "step": 1, "pairs": 7, "pairs_by_reason": {"safety": 3, "utility": 4}, "note": "x",
     "ok": True},
]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """``use(mode, **env)`` sets WANDB_MODE, WANDB_DIR (``tmp_path/wandb``, returned) and ``env``.
    wandb reads the environment once per process (``wandb.setup()``'s settings), so its setup is
    torn down first and after the test: each test gets the mode it sets."""
    import wandb

    def use(mode: str, **env: str):
        wandb.teardown()
        for key, value in {"WANDB_MODE": mode, "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": "true",
                           **env}.items():
            monkeypatch.setenv(key, value)
        (tmp_path / "wandb").mkdir(exist_ok=True)
        return tmp_path / "wandb"

    yield use
    wandb.teardown()


def test_scalars_flatten_nested_and_leave_out_axes_strings_and_booleans():
    assert tracking.scalars(ROWS[2] | {"time": 5.0}) == {"pairs": 7.0, "pairs_by_reason/safety": 3.0,
                                                        "pairs_by_reason/utility": 4.0}


def test_rows_get_wall_clock_time_and_reach_tensorboard(tmp_path):
    t0 = time.time()
    writer = MetricsWriter(tmp_path / "run" / "metrics.jsonl", TrackSection(tensorboard=True))
    for row in ROWS:
        writer.write(row)
    writer.close()
    t1 = time.time()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [{k: v for k, v in r.items() if k != "time"} for r in rows] == ROWS
    assert all(t0 - 0.01 <= r["time"] <= t1 + 0.01 for r in rows)
    assert rows[0]["time"] <= rows[1]["time"] <= rows[2]["time"]

    sft = tensorboard_scalars(tmp_path / "run" / "tensorboard" / "sft")
    assert sorted(sft) == ["loss", "lr", "truncated", "valid_loss"]
    assert [(s, v) for s, v, _ in sft["loss"]] == [(1, 2.5), (2, 2.0)]
    assert [(s, v) for s, v, _ in sft["valid_loss"]] == [(2, 2.25)]
    assert [w for _, _, w in sft["loss"]] == pytest.approx([r["time"] for r in rows[:2]], abs=1e-3)
    it = tensorboard_scalars(tmp_path / "run" / "tensorboard" / "erpo_iter")
    assert {k: [(s, v) for s, v, _ in x] for k, x in it.items()} == {
        "pairs": [(1, 7.0)], "pairs_by_reason/safety": [(1, 3.0)], "pairs_by_reason/utility": [(1, 4.0)]}


def test_wandb_offline_run_has_config_names_and_every_scalar(tmp_path, wandb_env):
    wandb_env("offline")
    track = TrackSection(wandb=True, wandb_project="proj", wandb_entity="team", wandb_tags="a, b")
    run = tmp_path / "myrun"
    writer = MetricsWriter(run / "metrics.jsonl", track, run_name="myrun", config={"train": {"lr": 0.5}})
    for row in ROWS[:2]:
        writer.write(row)
    writer.close()
    # A second writer (a resumed run, or the ERPO stage) continues the same W&B run.
    writer = MetricsWriter(run / "metrics.jsonl", track, run_name="myrun")
    writer.write(ROWS[2])
    writer.close()

    run_id = (run / "wandb_run_id").read_text().strip()
    infos = [r.run for r in wandb_records(tmp_path / "wandb") if r.WhichOneof("record_type") == "run"]
    assert len(infos) == 2
    assert {(i.project, i.entity, i.display_name, tuple(i.tags), i.run_id) for i in infos} == {
        ("proj", "team", "myrun", ("a", "b"), run_id)}
    history = [{k: v for k, v in h.items() if not k.startswith("_")} for h in wandb_history(tmp_path / "wandb")]
    assert history == [
        {"sft/step": 1, "sft/loss": 2.5, "sft/lr": 1e-3, "sft/truncated": 0},
        {"sft/step": 2, "sft/loss": 2.0, "sft/lr": 2e-3, "sft/truncated": 1, "sft/valid_loss": 2.25},
        {"erpo_iter/step": 1, "erpo_iter/pairs": 7, "erpo_iter/pairs_by_reason/safety": 3,
         "erpo_iter/pairs_by_reason/utility": 4},
    ]


def test_wandb_disabled_mode_closes_without_waiting_for_a_run_file(tmp_path, monkeypatch, wandb_env):
    wandb_env("disabled")
    monkeypatch.setattr(tracking, "WANDB_FLUSH_TIMEOUT_S", 0.5)  # waiting would raise after 0.5 s
    writer = MetricsWriter(tmp_path / "run" / "metrics.jsonl", TrackSection(wandb=True), run_name="run")
    writer.write(ROWS[0])
    writer.close()
    assert list(tmp_path.rglob("run-*.wandb")) == []
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [{k: v for k, v in r.items() if k != "time"} for r in rows] == ROWS[:1]


def test_enabled_backend_without_its_package_is_a_config_error(monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ConfigError, match=r"track\.wandb=true needs the wandb package: pip install 'safer\[track\]'"):
        load_config(None, ["track.wandb=true"])
    load_config(None, ["track.tensorboard=true"])  # installed: fine
    load_config(None, ["track.wandb=false"])


def test_wandb_close_waits_until_the_service_wrote_the_run_file(tmp_path, monkeypatch, wandb_env):
    """run.finish() only tells the wandb service to close the run's file (no reply); closing the
    backend waits for the file's exit record and fails, naming the file, when it never comes."""
    from wandb.sdk.lib.service.service_connection import ServiceConnection

    # The service writes the file only when a buffer fills or the run is finished (no timed flushes).
    wandb_env("offline", WANDB__TRANSACTION_LOG_FLUSH_INTERVAL="0")
    held = []  # (service, run id) of the finish notices kept from the service
    real_inform_finish = ServiceConnection.inform_finish
    monkeypatch.setattr(ServiceConnection, "inform_finish", lambda self, run_id: held.append((self, run_id)))
    monkeypatch.setattr(tracking, "WANDB_FLUSH_TIMEOUT_S", 0.5)
    writer = MetricsWriter(tmp_path / "run" / "metrics.jsonl", TrackSection(wandb=True), run_name="run")
    writer.write(ROWS[0])
    (run_file,) = (tmp_path / "wandb").rglob("run-*.wandb")
    with pytest.raises(RuntimeError, match=rf"W&B run file {run_file} has no exit record 0\.5s after run\.finish\(\)"):
        writer.close()
    assert "exit" not in [r.WhichOneof("record_type") for r in tracking.wandb_records(run_file)]

    # Once the service hears the run is finished it writes the file out, exit record last.
    (service, run_id), = held
    real_inform_finish(service, run_id)
    tracking.wait_for_wandb_run_file(run_file, 60.0)
    history = [{k: v for k, v in h.items() if not k.startswith("_")} for h in wandb_history(tmp_path / "wandb")]
    assert history == [{"sft/step": 1, "sft/loss": 2.5, "sft/lr": 1e-3, "sft/truncated": 0}]
