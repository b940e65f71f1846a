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


def test_per_forward_results_are_plain_attributes_eager_and_compiled():
    """`TransientState._set_transient` bypasses nn.Module.__setattr__: the results must stay
    plain attributes (never registered as modules, parameters or buffers), and a compiled
    forward (one graph) must record them as an eager one does."""
    from gatedmoe import Routing

    torch.manual_seed(0)
    moe = MoE(16, 4, 32, k=2, backend="grouped")
    x = torch.randn(8, 16)
    y = moe(x)
    eager_losses = dict(moe.aux_losses)
    for obj, name in ((moe, "last_routing"), (moe, "aux_losses"), (moe.gate, "gate_losses")):
        assert name in obj.__dict__, name
        assert name not in obj._modules and name not in obj._parameters and name not in obj._buffers, name
    assert isinstance(moe.last_routing, Routing) and moe.gate.gate_losses == {}
    moe.last_routing, moe.aux_losses = None, {}
    torch.testing.assert_close(torch.compile(moe, backend="aot_eager", fullgraph=True)(x), y)
    assert isinstance(moe.last_routing, Routing) and sorted(moe.aux_losses) == sorted(eager_losses)
    for name, loss in eager_losses.items():
        torch.testing.assert_close(moe.aux_losses[name], loss)
