"""`safer sft` with LoRA adapters (model.lora.rank=8), stopped by SIGTERM and resumed: the same
losses and weights as an uninterrupted run; checkpoints hold the adapters' optimizer state
only; `safer export` of a checkpoint gives the merged model and the adapter directory (CPU,
fp32, 2 learners under ZeRO-2, tiny test model)."""

from __future__ import annotations

import re
import signal

import pytest
import torch

from safer_dist.checkpointing.safe_load import weights_only_torch_load
from safer_dist.runtime.metrics import read_metrics
from safer_dist.train.lora import ADAPTER_DIR
from tests.e2e.jobctl import assert_session_gone, reap_all, run_job, start_job, wait_for
from tests.e2e.test_resume_faults import MAX_STEPS, STOP_GRACE_S, assert_same_run, ckpt_dir, sft_args

RANK = 8
# The test model: 2 blocks of 4 attention linears (64 -> 64) and 3 MLP linears (64 <-> 128),
# each adapted by r * (in + out) parameters.
ADAPTER_PARAMS = 2 * (4 * RANK * (64 + 64) + 3 * RANK * (64 + 128))


@pytest.fixture(autouse=True)
def _reap_jobs():
    yield
    reap_all()


def test_lora_sigterm_then_exact_resume_and_export_from_checkpoint(tmp_path, tiny_model_dir, demo_data_dir):
    from peft import PeftModel

    from safer_dist.train.models import load_model

    args = lambda name, *x: sft_args(tmp_path, name, tiny_model_dir, demo_data_dir, 2,  # noqa: E731
                                     f"model.lora.rank={RANK}", "train.lr=1e-2", *x)
    base_log = tmp_path / "base.log"
    assert run_job(args("base"), base_log) == 0, base_log.read_text()[-3000:]
    assert f"LoRA rank {RANK}, alpha 16 on 14 layers (all-linear): {ADAPTER_PARAMS:,} trainable" in base_log.read_text()

    # SIGTERM after step 2: the job stops with a checkpoint and exit 75; a relaunch resumes and finishes.
    log = tmp_path / "stop.log"
    metrics = tmp_path / "run" / "metrics.jsonl"
    job = start_job(args("run"), log)
    wait_for(lambda: metrics.exists() and len(read_metrics(metrics, "sft")) >= 2, 240, "step 2", job, log)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=STOP_GRACE_S + 30) == 75, log.read_text()[-3000:]
    assert_session_gone(job.pid)
    finish = tmp_path / "finish.log"
    assert run_job(args("run"), finish) == 0, finish.read_text()[-3000:]
    stopped_at = int(re.search(r"resumed from \S*step_(\d+) ", finish.read_text()).group(1))
    assert 2 <= stopped_at < MAX_STEPS
    assert_same_run(tmp_path / "base", tmp_path / "run", first_step=stopped_at + 1)

    # The checkpoint's optimizer state (fp32 master weights and both Adam moments, split over the
    # 2 ranks) covers the adapters alone.
    ckpt = ckpt_dir(tmp_path, "run", MAX_STEPS)
    numel = 0
    with weights_only_torch_load():
        for shard in sorted(ckpt.glob("*optim_states.pt")):
            opt = torch.load(shard, map_location="cpu")["optimizer_state_dict"]
            numel += sum(t.numel() for t in opt["single_partition_of_fp32_groups"])
            assert all(s["exp_avg"].numel() == s["exp_avg_sq"].numel()
                       for s in opt["base_optimizer_state"]["state"].values())
    assert numel == ADAPTER_PARAMS

    # `safer export` of the last checkpoint: the merged model equals the job's own export; peft
    # loads the adapters onto the base model to the same logits.
    out = tmp_path / "exported"
    assert run_job(["export", str(ckpt), "--out", str(out)], tmp_path / "export.log") == 0
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    with torch.no_grad():
        job_export = load_model(tmp_path / "run" / "hf", dtype=torch.float32)(input_ids=ids).logits
        from_checkpoint = load_model(out, dtype=torch.float32)(input_ids=ids).logits
        assert (from_checkpoint - job_export).abs().max() < 1e-5
        base = load_model(tiny_model_dir, dtype=torch.float32)
        assert (base(input_ids=ids).logits - job_export).abs().max() > 1e-3, "the adapters trained"
        peft_model = PeftModel.from_pretrained(base, str(out / ADAPTER_DIR))
        assert (peft_model(input_ids=ids).logits - job_export).abs().max() < 1e-5
