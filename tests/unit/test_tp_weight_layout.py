"""A tensor-parallel rollout rank refuses, at start, a model whose parameters the sharded weight
push cannot fill: they must show the unsharded model's names, order and full shapes."""

import pytest
import torch

from safer_dist.rollout.tensor_parallel import check_weight_layout
from safer_dist.train.models import load_model


def test_full_shapes_pass_and_a_plain_local_shard_is_refused(tiny_model_dir):
    model = load_model(tiny_model_dir, dtype=torch.float32)
    check_weight_layout(model)  # unsharded: the layout the learners send
    q = model.model.layers[1].self_attn.q_proj
    q.weight = torch.nn.Parameter(q.weight.detach()[:32].clone())  # rank 0's rows as a plain tensor
    with pytest.raises(RuntimeError, match=r"first difference: \('model\.layers\.1\.self_attn\.q_proj\.weight', "
                                           r"\(32, 64\)\) where the learners send \('model\.layers\.1\.self_attn"
                                           r"\.q_proj\.weight', \(64, 64\)\)"):
        check_weight_layout(model)
