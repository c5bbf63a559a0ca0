"BlN models in the tools researchers bring: copies and EMA, pickling, torch.func per-sample gradients."
import copy, io, pickle
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from batchless_nb.norm import BatchlessNorm1d, BatchlessNorm2d, batchless_loss, STD_PARAMS

pytestmark = pytest.mark.usefixtures('one_thread')


def _net(std_param='log', dtype=torch.float32):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.LeakyReLU(0.3), BatchlessNorm2d(4, std_param=std_param),
                        nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.LeakyReLU(0.3), BatchlessNorm1d(6, std_param=std_param),
                        nn.Linear(6, 3)).to(dtype)
    with torch.no_grad():
        for m in (net[2], net[6]): m.set_stats(torch.randn(m.num_features).to(dtype), torch.rand(m.num_features).to(dtype) + 0.5)
    return net


def test_deepcopy_and_pickle_after_a_training_forward():
    net = _net()
    x = torch.randn(8, 2, 5, 5)
    loss = net(x).sum() + batchless_loss(net)
    twin = copy.deepcopy(net)  # the NLLs still hold their graphs here
    loss.backward()
    assert twin[2].nll is not None and not twin[2].nll.requires_grad
    torch.testing.assert_close(twin[2].nll, net[2].nll.detach())
    back = pickle.loads(pickle.dumps(net))
    torch.testing.assert_close(back(x), net(x))
    buf = io.BytesIO(); torch.save(net, buf)


def test_averaged_model_ema_during_training():
    net = _net()
    ema = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        x = torch.randn(8, 2, 5, 5)
        (F.cross_entropy(net(x), torch.randint(0, 3, (8,))) + batchless_loss(net)).backward()
        opt.step(); opt.zero_grad()
        ema.update_parameters(net)
    best = copy.deepcopy(net)  # a best-model snapshot mid-training
    for p, q in zip(best.parameters(), net.parameters()): assert torch.equal(p, q)
    assert not all(torch.equal(p, q) for p, q in zip(ema.module.parameters(), net.parameters()))


@pytest.mark.parametrize('std_param', list(STD_PARAMS))
def test_torch_func_per_sample_gradients_equal_a_loop(std_param):
    "vmap(grad(...)) with the finite check on (skipped under the transform) == one backward per sample, float64"
    net = _net(std_param, torch.float64)
    x, y = torch.randn(5, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (5,))
    params = {k: v.detach() for k, v in net.named_parameters()}
    def loss(p, xi, yi):
        out = functional_call(net, p, (xi[None],))
        return F.cross_entropy(out, yi[None]) + batchless_loss(net)
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    assert net[2].check_finite
    for i in range(len(x)):
        net.zero_grad()
        (F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]) + batchless_loss(net)).backward()
        for k, p in net.named_parameters():
            torch.testing.assert_close(per_sample[k][i], p.grad, rtol=1e-12, atol=1e-12, msg=k)
