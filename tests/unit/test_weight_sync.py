"""weights/layout.py without processes: who takes the broadcast and who the CUDA-IPC hand-over
(the transfers themselves run on Ray actors in tests/ray/test_erpo_ray.py)."""

from __future__ import annotations

from safer_dist.weights.layout import Member, layout


def test_a_worker_on_the_senders_gpu_gets_the_ipc_hand_over():
    # colocated on one node of 2 GPUs: learner rank 0 and worker 0 share GPU a, worker 1 is on GPU b
    members = layout(["n1/a", "n1/a", "n1/b"])
    assert members == [
        Member(0, 3, group_rank=0, group_size=2, ipc_peers=(1,)),
        Member(1, 3, group_rank=None, group_size=2),
        Member(2, 3, group_rank=1, group_size=2),
    ]


def test_one_gpu_has_no_broadcast_group_and_cpu_never_uses_ipc():
    assert layout(["n1/a", "n1/a"]) == [Member(0, 2, 0, 1, (1,)), Member(1, 2, None, 1)]
    # CPU: no device keys, everyone broadcasts over gloo
    assert layout([None, None, None]) == [Member(m, 3, m, 3) for m in range(3)]
    # the same GPU name on another node is another GPU
    assert layout(["n1/a", "n2/a"]) == [Member(0, 2, 0, 2), Member(1, 2, 1, 2)]
