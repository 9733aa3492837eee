"""A 2-rank tensor-parallel rollout worker (rollout.tensor_parallel=2: two Ray actors, one gloo
group, the tiny model sharded by its TP plan) answers as a 1-rank worker: the same greedy
candidates and evaluation text, reference log-probs within 1e-5; and after a weight push of
perturbed weights (over the real weight-sync code, this process as learner rank 0) it holds
those weights: logits equal to the 1-rank worker's and to the perturbed model's own. Its rank 0
refuses the CUDA-IPC hand-over (it only receives by broadcast) and a sync of another dtype. A rank that dies fails the
worker's next call at once, naming the rank; a worker that cannot be placed fails within
rollout.placement_timeout_s, naming what it needs. An ERPO job with 2-rank workers (placed,
connected and pushed to by the job's own code) gives the 1-rank run's pairs."""

from __future__ import annotations

import dataclasses
import json
import socket
import time

import pytest
import torch

from safer_dist.cluster.placement import PlacementError
from safer_dist.cluster.rollout import RolloutGroup
from safer_dist.rollout.worker import RolloutFailure
from safer_dist.config import Config
from safer_dist.weights.channel import Channel, close_channel, send_weights
from safer_dist.weights.layout import Member, layout
from safer_dist.train.models import load_model

ITEMS = [
    ("How do I bake bread number 3, please?", "<ex_ante>\n<assessment>"),
    ("How do I write poem number 7, please?", ""),
    ("How do I pick a lock number 40, please?", "<ex_ante>\n<assessment>Intent: learn to pick a lock."),
]
IDS = list(range(5, 45))


def _answers(group: RolloutGroup) -> tuple[list, list, list, list]:
    """Greedy candidates, their log-probs as references, greedy evaluation text, and sampled
    candidates (temperature 1: rows that end at different steps, in two admission waves)."""
    kwargs = dict(n=2, stop_strings=["</assessment>", "."], max_new_tokens=10, seed=0)
    cands = group.sample(ITEMS, temperature=0.0, **kwargs)
    scored = [(p, x, c["text"], False) for (p, x), cs in zip(ITEMS, cands) for c in cs]
    texts = [r["text"] for r in group.generate([p for p, _ in ITEMS], max_new_tokens=8)]
    return cands, group.logprobs(scored), texts, group.sample(ITEMS, temperature=1.0, **kwargs)


def _assert_same(tp: tuple, plain: tuple) -> None:
    assert tp[0] == plain[0], "greedy candidates"
    assert tp[2] == plain[2], "greedy generate"
    assert [n for _, n in tp[1]] == [n for _, n in plain[1]]
    for (got, _), (want, _) in zip(tp[1], plain[1]):
        assert abs(got - want) <= 1e-5, (got, want)
    # Each row draws from its own stream by inverse CDF: logits within ~1e-7 draw the same token
    # unless a draw falls that close to a boundary (not for these seeds).
    assert tp[3] == plain[3], "sampled candidates"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def test_two_rank_worker_answers_as_one_rank_before_and_after_a_weight_push(ray_local, tiny_model_dir):
    cfg = Config()
    cfg.model.path = str(tiny_model_dir)
    one = dataclasses.replace(cfg.rollout, num_workers=1, cpus_per_worker=1, batch_size=4)
    plain = RolloutGroup(cfg.model, one, path=str(tiny_model_dir), device="cpu")
    tp = RolloutGroup(cfg.model, dataclasses.replace(one, tensor_parallel=2), path=str(tiny_model_dir), device="cpu")
    channel = None
    try:
        assert len(tp.workers) == 1 and len(tp.tp_workers.ranks[0]) == 2
        # The ranks really hold halves: q_proj's 64 output rows are 32 per rank.
        shapes = [ray_local.get(r.__ray_call__.remote(lambda w: tuple(w.model.model.layers[0].self_attn.q_proj
                                                                        .weight.to_local().shape)))
                  for r in tp.tp_workers.ranks[0]]
        assert shapes == [(32, 64), (32, 64)]

        before = _answers(plain)
        loaded = ray_local.get(plain.workers[0].logits.remote(IDS))
        _assert_same(_answers(tp), before)

        # Perturbed weights, pushed by this process as learner rank 0 to both workers at once.
        perturbed = load_model(tiny_model_dir, dtype=torch.float32)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in perturbed.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        ip, port = ray_local.util.get_node_ip_address(), _free_port()
        # Offered the CUDA-IPC hand-over (as if on learner rank 0's GPU), rank 0 refuses before
        # joining anything: sharded weights can only come by broadcast.
        with pytest.raises(ray_local.exceptions.RayTaskError, match="cannot fill sharded weights"):
            ray_local.get(tp.workers[0].init_sync.remote(ip, port, Member(1, 2, None, 1)), timeout=60)
        members = layout([None, None, None])  # CPU: every member broadcasts over gloo
        joins = [w.init_sync.remote(ip, port, m) for w, m in zip(plain.workers + tp.workers, members[1:])]
        channel = Channel(ip, port, members[0], "gloo", local_ip=ip, timeout_s=60)
        ray_local.get(joins, timeout=60)
        # A sync of another dtype (as learner rank 0 would announce it): rank 0 refuses it before
        # any bucket and both ranks stop together, so the worker is free for the next call.
        channel.store.set("v5/meta", "torch.bfloat16:123")
        with pytest.raises(ray_local.exceptions.RayTaskError, match="the learners send dtype:elements "
                                                                     "torch.bfloat16:123, this rollout worker holds"):
            ray_local.get([w.receive_weights.remote(5) for w in tp.workers], timeout=60)
        received = [w.receive_weights.remote(1) for w in plain.workers + tp.workers]
        send_weights(perturbed, channel, rank=0, zero3=False, version=1)
        assert ray_local.get(received, timeout=60) == [1, 1]
        plain.expected_version = tp.expected_version = 1  # as LearnerGroup.push_weights records it

        with torch.no_grad():
            want = perturbed(input_ids=torch.tensor([IDS]), use_cache=False).logits[0]
        got_tp = ray_local.get(tp.workers[0].logits.remote(IDS))
        got_plain = ray_local.get(plain.workers[0].logits.remote(IDS))
        assert (loaded - want).abs().max() > 1e-2, "the perturbation changed the logits"
        torch.testing.assert_close(got_plain, want, rtol=0, atol=0)
        torch.testing.assert_close(got_tp, want, rtol=0, atol=1e-5)
        after = _answers(plain)
        assert after[1] != before[1], "the push changed the weights the log-probs come from"
        _assert_same(_answers(tp), after)

        # A rank that dies fails the worker's next call at once, naming it (it cannot be replaced).
        ray_local.kill(tp.tp_workers.ranks[0][1], no_restart=True)
        with pytest.raises(RolloutFailure, match="tensor-parallel rank 1 of this rollout worker died during sample"):
            tp.sample(ITEMS, n=2, stop_strings=None, max_new_tokens=4, temperature=0.0)
    finally:
        close_channel(channel)
        tp.shutdown()
        plain.shutdown()


def test_a_worker_that_cannot_be_placed_fails_within_its_deadline(ray_local, tiny_model_dir):
    # Ray has 4 CPUs: two ranks of 3 CPUs each on one node cannot be placed.
    cfg = Config()
    rollout = dataclasses.replace(cfg.rollout, num_workers=1, cpus_per_worker=3, tensor_parallel=2,
                                  placement_timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match=r"the rollout worker 0 placement group needs \{CPU=3\} x 2 \(STRICT_PACK\) "
                                             r"and was not ready within rollout.placement_timeout_s=2 s"):
        RolloutGroup(cfg.model, rollout, path=str(tiny_model_dir), device="cpu")
    assert time.monotonic() - t0 < 30
    states = {pg["state"] for pg in ray_local.util.placement_group_table().values()}
    assert states <= {"REMOVED"}, "the placement group that waited was removed"


def test_an_erpo_job_with_tensor_parallel_workers_matches_one_rank_workers(ray_local, tiny_model_dir, demo_data_dir,
                                                                           tmp_path, monkeypatch):
    # The job's own path: placement() gives the 2-rank worker a STRICT_PACK group of 2 CPU bundles
    # beside the learner's, LearnerGroup.connect_weight_sync makes its rank 0 a broadcast member,
    # and the weights pushed after iteration 0 reach both ranks: iteration 1 samples the 1-rank
    # run's candidates and pairs, and the reference log-probs (from the workers) and step-DPO
    # losses agree to 1e-5.
    from safer_dist import jobs
    from safer_dist.cluster.placement import Cluster, placement
    from safer_dist.jobs import erpo_job
    from safer_dist.runtime.metrics import read_metrics
    from tests.ray.test_placement_ray import LengthParityJudge, _erpo_cfg

    monkeypatch.setattr(jobs, "RuleJudge", LengthParityJudge)
    runs = {}
    for name, k in (("one", 1), ("tp2", 2)):
        cfg = _erpo_cfg(tiny_model_dir, demo_data_dir, tmp_path, name, f"rollout.tensor_parallel={k}")
        groups = placement(cfg, "erpo", Cluster.from_ray()).phase("erpo").groups
        assert [(len(g.bundles), g.strategy) for g in groups] == [(1, "PACK"), (k, "STRICT_PACK" if k > 1 else "PACK")]
        erpo_job(cfg, keep_ray=True)
        run = tmp_path / name
        pairs = [(run / "erpo" / f"iter_{t}" / "pairs.jsonl").read_text() for t in (0, 1)]
        runs[name] = pairs, [(m["step"], m["loss"]) for m in read_metrics(run / "metrics.jsonl", "erpo")]
    pairs, losses = runs["one"]
    assert any(json.loads(r)["chosen"] is not None for r in pairs[1].splitlines()), "no pairs: nothing was compared"
    assert losses, "no step-DPO steps: nothing was compared"
    # the same candidates and pairs; the reference log-probs (sums over the continuation's tokens)
    # come from reductions in another order on the 2 ranks, so they agree to 1e-5
    for got, want in zip(runs["tp2"][0], pairs, strict=True):
        got, want = ([json.loads(r) for r in text.splitlines()] for text in (got, want))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            refs = [k for k in w if k.startswith("ref_") and w[k] is not None]
            assert {k: v for k, v in g.items() if k not in refs} == {k: v for k, v in w.items() if k not in refs}
            assert all(abs(g[k] - w[k]) <= 1e-5 for k in refs), [(g[k], w[k]) for k in refs]
    assert [s for s, _ in runs["tp2"][1]] == [s for s, _ in losses]
    for (_, got), (_, want) in zip(runs["tp2"][1], losses):
        assert abs(got - want) <= 1e-5, (got, want)
