"Tracked statistics and their plots: true_stats against a direct computation, sampling, the explorer's redraws."
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st
from torch.utils.data import DataLoader, TensorDataset
from batchless_nb.core import set_seed
from batchless_nb.data import get_data, dataloaders
from batchless_nb.models import get_model
from batchless_nb.norm import BatchlessNorm
from batchless_nb.core import eval_mode as _eval_mode
from batchless_nb.callbacks import batchless_learner, InitBatchless
from batchless_nb.track import ChannelMoments, ChannelSample, TrackStats, true_stats, norm_modules
from batchless_nb.runs import save_run, load_run
from batchless_nb.viz import plot_stats, plot_norm_error, plot_channel, plot_losses, plot_sweep, norm_errors
from batchless_nb.explore import explore



pytestmark = pytest.mark.usefixtures('one_thread')


def direct_stats(model, x, channel_dims):
    "Every input of every tracked layer collected with hooks, then mean and population std at once (float64)"
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0].double()))
             for n, m in norm_modules(model).items()]
    with _eval_mode(model), torch.no_grad(): model(x)
    for h in hooks: h.remove()
    out = {}
    for n, parts in seen.items():
        v = torch.cat(parts)
        v = v.movedim(channel_dims[n], 0).reshape(v.shape[channel_dims[n]], -1)
        out[n] = v.mean(1).numpy(), v.std(1, correction=0).numpy()
    return out


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 40), batch_size=st.integers(1, 17), offset=st.floats(-1e3, 1e3), scale=st.floats(1e-2, 1e2))
def test_true_stats_match_direct(n, batch_size, offset, scale):
    "Streamed, in any batch size, the statistics equal those of all values at once (BN, BlN channels-last, BlN 1d)"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Dropout(0.3),
                          nn.Conv2d(3, 4, 1), nn.Flatten(2), nn.Identity())
    model[5] = nn.Sequential(_Transpose(), BatchlessNorm(4, channel_dim=-1, std_param='inv'))
    with torch.no_grad(): model(torch.randn(8, 2, 5, 5))  # running stats move away from the truth
    x = torch.randn(n, 2, 5, 5) * scale + offset
    ts = true_stats(model, DataLoader(TensorDataset(x, torch.zeros(n)), batch_size=batch_size), n_samples=7)
    direct = direct_stats(model, x, {'1': 1, '5.1': -1})
    assert list(ts) == ['1', '5.1']
    for name, (mean, std) in direct.items():
        tol = 1e-6 * max(1.0, np.abs(mean).max())
        np.testing.assert_allclose(ts[name]['true_mean'], mean, rtol=0, atol=tol)
        np.testing.assert_allclose(ts[name]['true_std'], std, rtol=1e-6, atol=tol)
    assert ts['5.1']['sample'].shape == (4, min(7, n * 25))


class _Transpose(nn.Module):
    def forward(self, x): return x.transpose(1, 2)  # (N, C, L) -> (N, L, C): channels last


def test_channel_moments_large_offset():
    "float64 sums about a centre keep the std of values near 1e6 with spread 1e-3"
    x = torch.randn(10000, 2, dtype=torch.float64) * 1e-3 + 1e6
    cm = ChannelMoments()
    for b in x.split(333): cm.update(b)
    np.testing.assert_allclose(cm.std.numpy(), x.std(0, correction=0).numpy(), rtol=1e-6)


def test_channel_sample_is_uniform_and_seeded():
    "Each position is kept with probability k / n; the same seed keeps the same positions"
    x = torch.arange(50.).view(1, 1, 50)  # (N=1, C=1, L=50)
    keep = np.zeros(50)
    for seed in range(3000):
        s = ChannelSample(k=10, seed=seed)
        for b in x.split([7, 20, 23], dim=2): s.update(b)
        keep[s.sample[0].long().numpy()] += 1
    assert np.abs(keep / 3000 - 0.2).max() < 0.04
    a, b = ChannelSample(k=10, seed=3), ChannelSample(k=10, seed=3)
    a.update(x); b.update(x)
    assert torch.equal(a.sample, b.sample)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "A BlN and a BN run of the digits CNN, one epoch each, tracked and saved"
    data = get_data('digits')
    out, learners = tmp_path_factory.mktemp('runs'), {}
    for norm in ('bln-log', 'bn'):
        set_seed(0)
        learn = batchless_learner(get_model('digits_cnn', norm), dataloaders(data, batch_size=64, seed=0), progress=False,
                                  device='cpu', cbs=[InitBatchless(n_samples=300), TrackStats(every=3, n_samples=50)])
        learn.fit(1)
        learners[norm] = learn
        save_run(learn, out/norm)
    return learners, out


def test_plots_draw_one_point_per_channel(runs):
    learners, out = runs
    axs = plot_stats({'BlN': out/'bln-log', 'BN': out/'bn'})
    for j, c in enumerate((8, 16, 32)):
        for row in range(2): assert [len(col.get_offsets()) for col in axs[row, j].collections] == [c, c]
    axs = plot_norm_error(learners['bln-log'], layers=['norm2'])
    em, es = norm_errors(learners['bln-log'].stats_log, 'norm2')
    np.testing.assert_allclose(axs[0, 0].lines[0].get_ydata(), np.median(em, 1))
    np.testing.assert_allclose(axs[1, 0].lines[0].get_ydata(), np.median(es, 1))
    ax = plot_channel(out/'bln-log', 'norm1', channel=2, step=3)
    assert len(ax.lines) == 2 and len(ax.patches) > 3
    assert 'step 3' in ax.get_title()
    axs = plot_losses({'BlN': learners['bln-log'], 'BN': learners['bn']})
    assert len(axs[1].lines) == 3 + 1
    plt.close('all')


def test_plot_sweep_reads_the_cli_results(tmp_path):
    "The CSV columns the CLI writes; error bars span the seeds (range) or ± their std (default)"
    import csv
    rows = [dict(norm=n, batch_size=b, seed=s, best_val_loss=0.5 + s, best_val_acc=0.8 + 0.1 * s)
            for n in ('bn', 'bln-inv') for b in (2, 8) for s in (0, 1)]
    with open(tmp_path/'results.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0])); w.writeheader(); w.writerows(rows)
    axs = plot_sweep(tmp_path, spread='range')
    bars = axs[0].containers[0]
    np.testing.assert_allclose(bars.lines[0].get_ydata(), [0.85, 0.85])
    seg = bars.lines[2][0].get_segments()
    np.testing.assert_allclose([s[:, 1] for s in seg], [[0.8, 0.9], [0.8, 0.9]])
    seg = plot_sweep(tmp_path)[0].containers[0].lines[2][0].get_segments()  # the default: ± the std over seeds
    np.testing.assert_allclose([s[:, 1] for s in seg], [[0.85 - 0.05 * 2 ** 0.5, 0.85 + 0.05 * 2 ** 0.5]] * 2)
    plt.close('all')


def test_explorer_redraws_on_every_control(runs):
    learners, out = runs
    ex = explore({'BlN': out/'bln-log', 'BN': learners['bn']})
    images = [ex.image.value]
    for w, v in ((ex.layer_w, 'norm2'), (ex.channel_w, 15), (ex.step_w, 3), (ex.run_w, 'BN')):
        w.value = v
        assert w.value == v
        images.append(ex.image.value)
    assert len(set(images)) == len(images)
    assert all(im[:4] == b'\x89PNG' for im in images)
    assert 'BN' in ex.status.value


def test_explorer_of_a_sweep_directory(runs, tmp_path):
    "Each cell of a sweep directory with stats.npz becomes a run; the method choice becomes a dropdown past 4"
    import shutil
    learners, out = runs
    for i in range(5): shutil.copytree(out/'bln-log', tmp_path/'cells'/f'bln-log-bs{2**i}-seed0')
    ex = explore(tmp_path)
    assert list(ex.run_w.options) == [f'bln-log-bs{2**i}-seed0' for i in (0, 4, 1, 2, 3)]  # sorted by name
    assert type(ex.run_w).__name__ == 'Dropdown'
    with pytest.raises(ValueError, match='without tracked statistics'): explore(_empty_sweep(tmp_path))


def _empty_sweep(tmp_path):
    d = tmp_path/'empty'; (d/'cells').mkdir(parents=True)
    return d


def test_saved_run_round_trip(runs):
    learners, out = runs
    r = load_run(out/'bln-log')
    log = learners['bln-log'].stats_log
    assert r.stats.steps == log.steps
    for f in ('mean', 'std', 'true_mean', 'true_std', 'sample'):
        np.testing.assert_array_equal(r.stats.get('norm3', f), log.get('norm3', f))
