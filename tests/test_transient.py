import copy
import pickle

import torch

from gatedmoe import MoE, aux_loss
from gatedmoe.layers import MixtureOfDepths, MultiTaskMoE, SoftMoE


def _train_step(model, *inputs):
    model.train()
    out = model(*inputs)
    out = out if isinstance(out, torch.Tensor) else out[0]
    (out.pow(2).mean() + aux_loss(model)).backward()


def test_deepcopy_and_pickle_after_a_training_step():
    moe = MoE(8, 4, 16, gate_kwargs={"noisy": True})
    x = torch.randn(6, 8)
    _train_step(moe, x)
    assert moe.last_routing is not None and moe.aux_losses and moe.gate.gate_losses
    for clone in (copy.deepcopy(moe), pickle.loads(pickle.dumps(moe))):
        assert clone.last_routing is None and clone.aux_losses == {} and clone.gate.gate_losses == {}
        for (n, p), (_, q) in zip(moe.named_parameters(), clone.named_parameters(), strict=True):
            assert torch.equal(p, q), n
        clone.eval()
        moe.eval()
        torch.testing.assert_close(clone(x), moe(x))
    # the original keeps its state
    assert moe.last_routing is not None


def test_layer_variants_deepcopy_after_forward():
    x = torch.randn(2, 5, 8)
    for layer in (SoftMoE(8, 4, 16), MixtureOfDepths(torch.nn.Linear(8, 8), 8, capacity=0.5)):
        layer(x)
        copy.deepcopy(layer)
    mt = MultiTaskMoE(8, 4, 16, n_tasks=2)
    mt(x.reshape(-1, 8))
    copy.deepcopy(mt)
