"""The learner's client optimizer (fused AdamW on CUDA, the per-tensor loop elsewhere) and how a step reads
its metrics back."""

from __future__ import annotations

import torch

from safer_dist.train.engine import client_optimizer_kwargs


def test_client_optimizer_kwargs_by_device():
    assert client_optimizer_kwargs("cuda") == {"fused": True}
    assert client_optimizer_kwargs("cuda:1") == {"fused": True}
    assert client_optimizer_kwargs("cpu") == {"foreach": False}


def _two_steps(lr: float = 1e-2, **kwargs) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, **kwargs)
    for _ in range(2):
        for p in params:
            p.grad = torch.sin(p.detach() * 3)  # a fixed function of the weights
        opt.step()
    return [p.detach() for p in params]


def test_both_choices_are_adamw_arguments_with_the_same_update():
    """Each device's keyword arguments construct AdamW (this CPU torch runs the fused kernel too),
    and the fused update equals the per-tensor loop's up to rounding."""
    loop = _two_steps(**client_optimizer_kwargs("cpu"))
    fused = _two_steps(**client_optimizer_kwargs("cuda"))
    start = _two_steps(lr=0.0)
    for a, b, s in zip(loop, fused, start):
        assert not torch.equal(a, s)  # the steps moved the weights
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_read_numbers_keeps_order_and_reads_tensors_once(monkeypatch):
    """A step's metrics: tensors of any shape, numbers and None (a grad norm DeepSpeed did not
    compute) flattened in order, with every tensor read back in one copy."""
    from safer_dist.train.engine import read_numbers

    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.shape) or real(self))
    values = [torch.tensor([1.5, 2.0], dtype=torch.float64), 3, torch.tensor(0.25), None,
              torch.tensor([[4.0], [5.0]])]
    out = read_numbers(values, "cpu")
    assert out[:3] == [1.5, 2.0, 3.0] and out[3] == 0.25 and out[4] != out[4] and out[5:] == [4.0, 5.0]
    assert reads == [torch.Size([5])]  # 2 + 1 + 2 tensor elements, one read
    assert read_numbers([None, 2], "cpu")[1] == 2.0
