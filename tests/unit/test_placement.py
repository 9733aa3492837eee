"""safer_dist/cluster/placement.py: what every stage places, and `safer plan` and `safer slurm
submit --dry-run` agreeing on it (the Ray side is in tests/ray/test_placement_ray.py)."""

from __future__ import annotations

import itertools

import pytest

from launcher.cli import main
from safer_dist.cluster.placement import Cluster, PlacementError, placement
from safer_dist.cluster.slurm import REPO
from safer_dist.config import load_config

TINY = REPO / "configs" / "tiny.yaml"
# Batches that divide over 1, 2, 4, 6 and 8 learners at micro-batch 1.
BATCHES = ["train.micro_batch_size=1", "train.global_batch_size=24", "erpo.optim.micro_batch_size=1",
           "erpo.optim.global_batch_size=24"]


def _cfg(*overrides):
    return load_config(TINY, [*BATCHES, *overrides])


def test_colocated_erpo_shares_each_gpu_between_a_learner_and_a_worker():
    cfg = _cfg("learner.num_learners=1", "rollout.num_workers=1", "learner.cpus_per_learner=4",
               "rollout.cpus_per_worker=2")
    p = placement(cfg, "run", Cluster.uniform(1, 1))
    assert p.gpu and p.mode == "colocate" and p.fits
    erpo = p.phase("erpo")
    (shared,) = erpo.groups
    # one bundle: one GPU, the learner's 4 CPUs + the worker's 2
    assert shared.bundles == ({"CPU": 6.0, "GPU": 1.0},) and shared.members == (("learner", "rollout"),)
    assert (erpo.actors["learner"].gpus, erpo.actors["rollout"].gpus) == (0.5, 0.5)
    assert erpo.num_gpus == 1 and erpo.nodes == [{"learner": 1, "rollout": 1}]
    # SFT and evaluation place one group each, on a whole GPU
    assert p.phase("sft").actors["learner"].gpus == 1.0 and p.phase("eval").actors["rollout"].gpus == 1.0


def test_judge_model_and_sft_reference_share_the_bundles_too():
    cfg = _cfg("learner.num_learners=8", "rollout.num_workers=8", "judge.kind=model", "judge.model_path=/x",
               "erpo.reference=sft")
    erpo = placement(cfg, "erpo", Cluster.uniform(1, 8)).phase("erpo")
    assert erpo.problem is None and erpo.num_gpus == 8
    # four kinds of actor per bundle, a quarter of its GPU each
    assert {r: a.gpus for r, a in erpo.actors.items()} == {"learner": 0.25, "rollout": 0.25, "judge": 0.25,
                                                           "reference": 0.25}
    # a third, where Ray keeps 4 decimals: three shares never exceed one GPU
    three = placement(_cfg("judge.kind=model", "judge.model_path=/x"), "erpo", Cluster.uniform(1, 2)).phase("erpo")
    assert three.actors["learner"].gpus == 0.3333


def test_separate_placement_counts_every_rollout_group():
    # the case: erpo.reference=sft on one 8-GPU node, 6 learners + 2 workers per group
    cfg = _cfg("learner.num_learners=6", "rollout.num_workers=2", "erpo.reference=sft", "rollout.placement=separate")
    p = placement(cfg, "run", Cluster.uniform(1, 8))
    erpo = p.phase("erpo")
    assert erpo.num_gpus == 6 + 2 + 2 and not p.fits
    assert erpo.problem == ("the SFT-reference rollout placement group (SFT-reference rollout: rollout.num_workers=2, "
                            "rollout.cpus_per_worker=1) needs {GPU=1, CPU=1} x 2 (PACK); the cluster has GPU=0 free")
    with pytest.raises(PlacementError, match="Use rollout.placement=colocate"):
        p.check()
    # colocated, the same job needs 6 GPUs
    assert placement(_cfg("learner.num_learners=6", "rollout.num_workers=2", "erpo.reference=sft"), "run",
                     Cluster.uniform(1, 8)).fits


def test_lora_learners_are_the_sft_reference_so_no_reference_group_is_placed():
    # erpo.reference=sft with adapters: the learners' base, adapters off (safer_dist/train/lora_reference.py)
    sep = ("learner.num_learners=6", "rollout.num_workers=2", "erpo.reference=sft", "rollout.placement=separate")
    erpo = placement(_cfg(*sep, "model.lora.rank=8"), "erpo", Cluster.uniform(1, 8)).phase("erpo")
    assert set(erpo.actors) == {"learner", "rollout"} and erpo.num_gpus == 6 + 2 and erpo.problem is None
    shared = placement(_cfg("erpo.reference=sft", "model.lora.rank=8"), "erpo", Cluster.uniform(1, 2)).phase("erpo")
    assert {r: a.gpus for r, a in shared.actors.items()} == {"learner": 0.5, "rollout": 0.5}


def test_cpu_default_is_separate_and_colocate_uses_cpu_bundles():
    cfg = _cfg("launch.device=cpu")
    p = placement(cfg, "erpo", Cluster.uniform(1, 0, 4))
    assert not p.gpu and p.mode == "separate" and len(p.phase("erpo").groups) == 2 and p.fits
    co = placement(_cfg("launch.device=cpu", "rollout.placement=colocate"), "erpo", Cluster.uniform(1, 0, 4))
    (shared,) = co.phase("erpo").groups
    assert shared.bundles == ({"CPU": 2.0},) * 2 and co.fits
    # 3 CPUs: the second shared bundle has no room
    assert not placement(_cfg("launch.device=cpu", "rollout.placement=colocate"), "erpo",
                         Cluster.uniform(1, 0, 3)).fits


def test_strategies_place_like_ray():
    cfg = _cfg("learner.num_learners=4", "learner.placement=STRICT_SPREAD", "launch.device=cpu")
    assert not placement(cfg, "sft", Cluster.uniform(2, 0, 8)).fits
    assert placement(cfg, "sft", Cluster.uniform(4, 0, 1)).phase("sft").nodes == [{"learner": 1}] * 4
    pack = _cfg("learner.num_learners=4", "learner.placement=STRICT_PACK", "launch.device=cpu")
    assert not placement(pack, "sft", Cluster.uniform(2, 0, 2)).fits
    spread = _cfg("learner.num_learners=4", "learner.placement=SPREAD")
    assert placement(spread, "sft", Cluster.uniform(2, 8)).phase("sft").nodes == [{"learner": 2}, {"learner": 2}]


# ---------------------------------------------------------------- plan and slurm agree

GRID = list(itertools.product(
    ("rule", "model", "classifier"),             # judge.kind
    ("iteration", "sft"),                        # erpo.reference
    ("colocate", "separate"),                    # rollout.placement
    (1, 2, 8),                                   # GPUs per node
    ((1, 1), (2, 2), (6, 2), (8, 8), (2, 4)),    # learners, workers per group
))


def _grid_overrides(tmp_path, judge, reference, mode, learners, workers):
    return [*BATCHES, f"run.output_dir={tmp_path}", f"judge.kind={judge}", "judge.model_path=/x",
            f"erpo.reference={reference}", f"rollout.placement={mode}", f"learner.num_learners={learners}",
            f"rollout.num_workers={workers}"]


@pytest.mark.parametrize("judge, reference, mode, gpus, sizes", GRID)
def test_plan_and_slurm_dry_run_accept_and_refuse_the_same_configs(tmp_path, capsys, judge, reference, mode, gpus,
                                                                   sizes):
    over = _grid_overrides(tmp_path, judge, reference, mode, *sizes)
    planned = main(["plan", str(TINY), *over, "--gpus-per-node", str(gpus), "--gpu-mem-gb", "80", "--shape", "test"])
    submitted = main(["slurm", "submit", str(TINY), *over, "--nodes", "1", "--gpus-per-node", str(gpus),
                      "--mem", "8G", "--dry-run"])
    assert planned in (0, 3) and submitted in (0, 2)
    assert (planned == 0) == (submitted == 0), capsys.readouterr()
    # and both agree with the rule itself: separate needs learners + groups x workers GPUs, colocate the larger
    groups = 1 + (judge != "rule") + (reference == "sft")  # a model or classifier judge has its own group
    learners, workers = sizes
    need = max(learners + groups * workers, workers * (1 + (judge != "rule"))) if mode == "separate" else \
        max(learners, workers)
    assert (planned == 0) == (need <= gpus)


def test_plan_exits_3_naming_what_does_not_fit(capsys):
    # The one-GPU case: 1 learner + 2 workers colocated need 2 GPUs (the second bundle)
    recipe = str(REPO / "configs" / "llama3-8b-8xh100.yaml")
    over = ["learner.num_learners=1", "train.global_batch_size=16", "erpo.optim.global_batch_size=8"]
    args = ["--gpus-per-node", "1", "--gpu-mem-gb", "80", "--shape", "llama3-8b"]
    assert main(["plan", recipe, *over, "rollout.num_workers=2", *args]) == 3
    out = capsys.readouterr().out
    assert "DOES NOT FIT: eval: the policy rollout placement group" in out
    # one learner and one colocated worker on the one GPU: placeable, and the plan says how the
    # memory is time-shared (the optimizer states go to host memory)
    assert main(["plan", recipe, *over, "rollout.num_workers=1", *args]) == 0
    out = capsys.readouterr().out
    assert "placement erpo: 1 learner actor(s) x GPU=0.5, CPU=4 + 1 policy rollout actor(s) x GPU=0.5, CPU=4" in out
    assert "colocated ERPO (learner and 1 rollout worker(s) time-share each GPU" in out
    assert "learner.offload_optimizer=true" in out


def test_slurm_dry_run_exits_2_naming_the_resource(tmp_path, caplog):
    over = _grid_overrides(tmp_path, "rule", "sft", "separate", 6, 2)
    rc = main(["slurm", "submit", str(TINY), *over, "--nodes", "1", "--gpus-per-node", "8", "--mem", "8G", "--dry-run"])
    assert rc == 2
    assert "SFT-reference rollout placement group" in caplog.text and "the cluster has GPU=0, CPU=2 free" in caplog.text


# ---------------------------------------------------------------- tensor-parallel rollout workers

TP_GRID = list(itertools.product(
    (("rule", "iteration"), ("model", "sft"), ("classifier", "iteration")),  # judge.kind, erpo.reference
    ("auto", "separate", "colocate"),            # rollout.placement
    (2, 4, 8),                                   # GPUs per node (one node)
    ((1, 1), (2, 2), (4, 1)),                    # learners, workers per group
    (2, 4),                                      # rollout.tensor_parallel
))


@pytest.mark.parametrize("judged, mode, gpus, sizes, tp", TP_GRID)
def test_plan_and_slurm_agree_on_tensor_parallel_workers(tmp_path, capsys, judged, mode, gpus, sizes, tp):
    over = [*_grid_overrides(tmp_path, *judged, mode, *sizes), f"rollout.tensor_parallel={tp}"]
    planned = main(["plan", str(TINY), *over, "--gpus-per-node", str(gpus), "--gpu-mem-gb", "80", "--shape", "test"])
    submitted = main(["slurm", "submit", str(TINY), *over, "--nodes", "1", "--gpus-per-node", str(gpus),
                      "--mem", "8G", "--dry-run"])
    out = capsys.readouterr()
    if mode == "colocate":  # refused as a config mistake by both, naming the fields
        assert planned == submitted == 2
        assert "rollout.placement=colocate cannot place tensor-parallel rollout workers" in out.out + out.err
        return
    assert planned in (0, 3) and submitted in (0, 2)
    assert (planned == 0) == (submitted == 0), out
    # always separate: learners + groups x workers x K GPUs in ERPO, (1 + judge) x workers x K in
    # the evaluation; on one node that is all there is to it
    groups = 1 + (judged[0] != "rule") + (judged[1] == "sft")
    learners, workers = sizes
    need = max(learners + groups * workers * tp, (1 + (judged[0] != "rule")) * workers * tp)
    assert (planned == 0) == (need <= gpus)


def test_a_tensor_parallel_worker_needs_its_k_gpus_on_one_node(tmp_path, capsys):
    # 2 nodes x 4 GPUs: 2 learners + 2 workers x 3 ranks = 8 GPUs, but after the learners (node 0)
    # node 0 has 2 GPUs and node 1 4: worker 0 takes 3 of node 1, worker 1 finds 3 nowhere.
    cfg = _cfg("learner.num_learners=2", "rollout.num_workers=2", "rollout.tensor_parallel=3")
    p = placement(cfg, "erpo", Cluster.uniform(2, 4))
    assert p.mode == "separate" and not p.fits
    erpo = p.phase("erpo")
    assert [g.strategy for g in erpo.groups] == ["PACK", "STRICT_PACK", "STRICT_PACK"]
    assert erpo.groups[1].bundles == ({"CPU": 1.0, "GPU": 1.0},) * 3
    assert erpo.problem == ("the policy rollout worker 1 placement group (policy rollout: rollout.num_workers=2, "
                            "rollout.cpus_per_worker=1, rollout.tensor_parallel=3) needs {GPU=1, CPU=1} x 3 "
                            "(STRICT_PACK); the cluster has GPU=3 on 2 nodes (GPU=2; GPU=1) free")
    with pytest.raises(PlacementError, match="rollout.tensor_parallel=3 places each rollout worker on that many GPUs"):
        p.check()
    # with K=2 the second worker takes node 0's last 2 GPUs: it fits, each worker on one node
    two = placement(_cfg("learner.num_learners=2", "rollout.num_workers=2", "rollout.tensor_parallel=2"), "erpo",
                    Cluster.uniform(2, 4)).phase("erpo")
    assert two.problem is None and two.nodes == [{"learner": 2, "rollout": 2}, {"rollout": 2}]
    # and `safer slurm submit --dry-run` says the same as `safer plan` for both
    for k, rc_plan, rc_slurm in ((3, 3, 2), (2, 0, 0)):
        over = [*BATCHES, f"run.output_dir={tmp_path}", "learner.num_learners=2", "rollout.num_workers=2",
                f"rollout.tensor_parallel={k}"]
        assert main(["plan", str(TINY), *over, "--nodes", "2", "--gpus-per-node", "4", "--gpu-mem-gb", "80",
                     "--shape", "test", "--stage", "erpo"]) == rc_plan
        assert main(["slurm", "submit", str(TINY), *over, "--stage", "erpo", "--nodes", "2", "--gpus-per-node", "4",
                     "--mem", "8G", "--dry-run"]) == rc_slurm
