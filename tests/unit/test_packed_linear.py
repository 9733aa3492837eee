"""CPU linear layers on oneDNN-reordered weights (what candidate sampling runs): the same outputs
as ``nn.Linear`` to float32 rounding, the modules' own forward back after the context (after an
error too), fresh weights on every entry, other layers left alone, and a plain fallback."""

import pytest
import torch
import torch.nn.functional as F

import safer_dist.rollout.packed_linear as pl
from safer_dist.rollout.packed_linear import packed_linears

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


class _Subclass(torch.nn.Linear):  # stands for a quantized or sharded layer: keeps its own forward
    pass


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.Linear(40, 24, bias=False), _Subclass(24, 8),
                               torch.nn.Linear(8, 8).to(torch.bfloat16))


def _own_forwards(model) -> list[str]:
    return [type(m).__name__ for m in model.modules() if "forward" in m.__dict__]


@needs_onednn
@pytest.mark.parametrize("shape", [(5, 48), (2, 7, 48)], ids=["rows", "batch-seq"])
def test_same_outputs_as_nn_linear_and_forward_restored(shape):
    model = _model()
    x = torch.randn(*shape)
    want = [model[0](x), model[1](model[0](x))]
    with packed_linears(model, rows_hint=4):
        # The exact nn.Linear layers in fp32 run the packed forward; the subclass and the bf16 layer do not.
        assert _own_forwards(model) == ["Linear", "Linear"]
        assert model[2].forward.__func__ is torch.nn.Linear.forward and model[3].forward.__func__ is torch.nn.Linear.forward
        got = [model[0](x), model[1](model[0](x))]
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert _own_forwards(model) == []


@needs_onednn
def test_forward_restored_after_an_error():
    model = _model()
    with pytest.raises(KeyError), packed_linears(model):
        assert _own_forwards(model)
        raise KeyError("boom")
    assert _own_forwards(model) == []


@needs_onednn
def test_each_entry_reorders_the_weights_it_finds():
    # A weight sync between two sampling calls changes the weights in place (copy_ into
    # .data bumps no version counter): the next call must see them, never a stale copy.
    model = _model()
    x = torch.randn(3, 48)
    with packed_linears(model):
        before = model[0](x)
    model[0].weight.data.copy_(torch.randn(40, 48))
    with packed_linears(model):
        after = model[0](x)
    torch.testing.assert_close(after, F.linear(x, model[0].weight, model[0].bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before)


def test_falls_back_to_nn_linear_with_one_warning(monkeypatch):
    def refuse(weight, rows):
        raise RuntimeError("no oneDNN here")

    warnings: list[str] = []
    monkeypatch.setattr(pl, "_reorder", refuse)
    monkeypatch.setattr(pl, "_WARNED", set())
    monkeypatch.setattr(pl.log, "warning", warnings.append)
    model = _model()
    x = torch.randn(3, 48)
    for _ in range(2):
        with packed_linears(model):
            assert _own_forwards(model) == []
            assert torch.equal(model[0](x), F.linear(x, model[0].weight, model[0].bias))
    assert len(warnings) == 1 and "no oneDNN here" in warnings[0] and "nn.Linear" in warnings[0]


@needs_onednn
def test_a_forward_installed_on_the_instance_is_left_alone():
    # transformers' tensor parallelism installs its forward (collectives around the local
    # matmul) on each sharded nn.Linear instance: packing would skip it, restoring would delete it.
    model = _model()
    first = model[0]
    calls = []

    def installed(x, _forward=first.forward):
        calls.append(x.shape)
        return _forward(x)

    first.forward = installed
    x = torch.randn(3, 48)
    with packed_linears(model):
        assert first.forward is installed
        assert "forward" in model[1].__dict__, "the other plain layers are still packed"
        first(x)
    assert first.forward is installed and model[1].__dict__.get("forward") is None
    first(x)
    assert calls == [(3, 48), (3, 48)]
