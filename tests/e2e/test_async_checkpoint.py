"""`safer sft` with checkpoint.async_save killed for real in the middle of a background write
(CPU, fp32, 2 learners, ZeRO-2, tiny test model)."""

from __future__ import annotations

import re

from safer_dist.checkpointing.async_save import TEST_HANG_IN_BACKGROUND_WRITE
from safer_dist.checkpointing.checkpoint import COMPLETE, verify_manifest
from safer_dist.runtime.metrics import read_metrics
from tests.e2e.jobctl import kill_job, run_job, start_job, wait_for
from tests.e2e.test_resume_faults import _reap_jobs, assert_same_run, ckpt_dir, sft_args  # noqa: F401 - fixture


def test_kill_during_a_background_write_resumes_from_the_previous_complete_checkpoint(tmp_path, tiny_model_dir,
                                                                                       demo_data_dir):
    """Checkpoints every 4 steps, written in the background. Each learner rank's write of step 8
    hangs after its first file (test hook); the driver trains on past step 8 (the save did not
    block the step loop) and the job is SIGKILLed there. Step 4 is complete and verifies; step 8
    has no COMPLETE. The relaunch resumes from step 4 and finishes; steps 5..12 and the final
    weights equal an uninterrupted run with synchronous checkpoints bit for bit."""
    args = lambda name, *x: sft_args(tmp_path, name, tiny_model_dir, demo_data_dir, 2, *x)  # noqa: E731
    assert run_job(args("base"), tmp_path / "base.log") == 0

    log1 = tmp_path / "kill.log"
    job = start_job(args("run", "checkpoint.async_save=true"), log1, env={TEST_HANG_IN_BACKGROUND_WRITE: "step_8"})
    step8 = ckpt_dir(tmp_path, "run", 8)

    def trained_past_step_8() -> bool:
        steps = [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl", "sft")] \
            if (tmp_path / "run" / "metrics.jsonl").exists() else []
        return (step8 / "trainer_state.json").is_file() and max(steps, default=0) >= 10

    wait_for(trained_past_step_8, 240, "training past the background write of step 8", job, log1)
    kill_job(job)
    text = log1.read_text()
    assert re.search(r"checkpoint \S*step_8: state copied to host memory in [\d.]+ s; writing in the background",
                     text), text[-3000:]
    assert (ckpt_dir(tmp_path, "run", 4) / COMPLETE).is_file()
    verify_manifest(ckpt_dir(tmp_path, "run", 4))
    assert step8.is_dir() and not (step8 / COMPLETE).exists()

    log2 = tmp_path / "resume.log"
    assert run_job(args("run", "checkpoint.async_save=true"), log2) == 0, log2.read_text()[-3000:]
    text = log2.read_text()
    assert re.search(r"skipping incomplete checkpoint \S*step_8 \(no COMPLETE\); left in place", text), text[-3000:]
    assert re.search(r"resumed from \S*step_4 ", text), text[-3000:]
    for step in (8, 12):
        verify_manifest(ckpt_dir(tmp_path, "run", step))
    assert_same_run(tmp_path / "base", tmp_path / "run", first_step=5)
