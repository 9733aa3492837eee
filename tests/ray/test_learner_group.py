"""The learner group as real Ray actors: train a few steps, write a complete checkpoint,
compute the validation loss."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from safer_dist.checkpointing.checkpoint import COMPLETE, Checkpointer
from safer_dist.config import load_config
from safer_dist.cluster.group import LearnerGroup
from safer_dist.runtime.metrics import read_metrics
from safer_dist.train.models import load_model
from safer_dist.train.sft import train_sft
from safer_dist.train.throughput import non_embedding_params


def test_learner_actors_train_and_checkpoint(ray_local, tiny_model_dir, demo_data_dir, tmp_path):
    cfg = load_config(None, [
        f"model.path={tiny_model_dir}", f"data.train={demo_data_dir / 'sft.jsonl'}", "data.max_seq_len=256",
        f"run.output_dir={tmp_path}", "run.name=r", "train.max_steps=6", "train.warmup_steps=0", "train.lr=3e-3",
        "train.global_batch_size=8", "train.micro_batch_size=4", "learner.num_learners=2",
        "learner.zero_stage=2", "checkpoint.every_steps=3", "launch.device=cpu", "learner.peak_tflops=0.5",
        "train.eval_every_steps=4", "data.valid_fraction=0.05",
    ])
    group = LearnerGroup(cfg)
    try:
        pids = ray_local.get([a.__ray_call__.remote(lambda self: __import__("os").getpid()) for a in group.actors])
        assert len(set(pids)) == 2, "each rank is its own actor process"
        state = train_sft(cfg, group, cfg.run.dir)
        # A learner that gets a SIGINT (Ray starts its workers with SIGINT blocked) keeps
        # answering: a Ctrl-C is the driver's to act on (safer_dist/runtime/stop.py).
        os.kill(group.pids[1], signal.SIGINT)
        valid = group.eval_loss()
        train_sizes = ray_local.get([a.__ray_call__.remote(lambda self: len(self._data)) for a in group.actors])
        weights = group.full_state_dict()
    finally:
        group.shutdown()
    # The held-out 5% (round(256 * 0.05) = 13 examples) left the training set on every rank.
    assert train_sizes == [256 - 13, 256 - 13]
    # valid_loss = total NLL / total labelled tokens over the 13 held-out examples under the
    # final weights, computed here one unpacked example at a time: log_softmax at position t,
    # the token at t+1, wherever the label at t+1 is not -100.
    expected_nll, expected_tokens = _held_out_nll(cfg, tiny_model_dir, weights)
    assert valid["num_valid_tokens"] == expected_tokens
    assert valid["valid_loss"] == pytest.approx(expected_nll / expected_tokens, rel=1e-5)
    rows = read_metrics(cfg.run.dir / "metrics.jsonl", "sft")
    assert [m["step"] for m in rows if "valid_loss" in m] == [4, 6]  # every 4 steps and the last
    # No update since step 6: the same weights give the same loss, bit for bit.
    assert rows[-1]["valid_loss"] == valid["valid_loss"]
    assert state.step == 6
    ckpts = Checkpointer(cfg.checkpoint, cfg.run.dir / "checkpoints" / "sft")
    latest = ckpts.latest_complete()
    assert latest is not None and latest.name == "step_6" and (latest / COMPLETE).is_file()
    assert json.loads((latest / "trainer_state.json").read_text())["step"] == 6
    # Both ranks wrote their optimizer shard and RNG state.
    for rank in (0, 1):
        assert (latest / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
        assert (latest / f"rng_rank{rank}.pt").is_file()
    losses = [m["loss"] for m in rows]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # Throughput: MFU = 6 * non-embedding params * tokens/s / (2 learners x 0.5 TFLOP/s).
    n_params = non_embedding_params(load_model(tiny_model_dir, dtype=torch.float32))
    assert [info["num_params_non_embedding"] for info in group.infos] == [n_params, n_params]
    for m in rows:
        assert m["tokens_per_s"] > 0
        assert abs(m["mfu"] - 6 * n_params * m["tokens_per_s"] / 1e12) < 1e-12


def _held_out_nll(cfg, model_dir, weights) -> tuple[float, int]:
    from safer_dist.data.records import load_records
    from safer_dist.train.models import load_model, load_tokenizer
    from safer_dist.train.sft_data import encode_example, split_valid

    _, held = split_valid(load_records(cfg.data.train, "sft"), cfg.data.valid_fraction, cfg.run.seed)
    assert len(held) == 13
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.float32, attn_implementation="eager", device="cpu")
    model.load_state_dict(weights)
    nll, count = 0.0, 0
    with torch.no_grad():
        for r in held:
            ex = encode_example(tok, r["prompt"], r["response"], max_seq_len=cfg.data.max_seq_len, overlong="truncate")
            ids, labels = torch.tensor([ex.input_ids]), torch.tensor(ex.labels)
            logp = model(input_ids=ids, use_cache=False).logits[0, :-1].double().log_softmax(-1)
            for t in range(len(ex.labels) - 1):
                if labels[t + 1] != -100:
                    nll -= float(logp[t, labels[t + 1]])
                    count += 1
    return nll, count
