"""Closing the gap (nbs/92_closing_the_gap.ipynb): remedies and diagnostics (at batch 64 unless told) on the CIFAR-10 subset (paper CNN, 3 epochs, test split), beyond
what `batchless-nb sweep` can vary. Each run writes config.json + metrics.json (as `batchless-nb train`) and model.pt
to OUT/cells/NAME-bsB-seedS; finished runs are skipped.

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/gap_remedies.py OUT CIFAR_ARCHIVE [--seeds 0 1] [--batch-sizes 64] [NAME ...]

Remedies for the paper's recipe (Adam trains the statistics): the width-invariant NLL, no data-driven init, a separate
stats learning rate. On top of the natural update (eta 0.01):
- `batch_projection`: the gradient reaching each BlN layer's input made orthogonal, over the current batch and per
  channel, to the constant and to x: g - mean(g) - (x - mean(x)) * cov(g, x) / var(x), which is batch norm's backward
  when mu, sigma are the batch's own (a test of the stop-gradient hypothesis; it needs the whole batch, so it is not
  a remedy itself);
- `ema_projection`: the same with running averages (weight 0.01 per step) of those moments from earlier steps,
  batch-free (the idea of Online Normalization's backward correction, Chiley et al. 2019);
- `train_mode_init`: the data-driven init measured with dropout on, the distribution the NLL then fits
  (`InitBatchless(dropout=True)`, `--init-dropout`, now the default; every other remedy uses the paper's init);
- `no_init`: statistics start at N(0, 1);
- `lr5e-4`: Adam at half the learning rate (and `none-lr5e-4` for the baseline at that rate);
- `fc6x0.1`: the classifier's initial weights scaled by 0.1 (smaller initial logits);
- `preserve_function`: the init sets gamma = sigma, beta = mu, so the network starts as the unnormalized one.
"""
import argparse
from pathlib import Path
import torch
from batchless_nb.init import init_batchless
from batchless_nb.core import set_seed
from batchless_nb.data import get_data, dataloaders
from batchless_nb.models import get_model
from batchless_nb.norm import batchless_modules, BatchlessNorm
from batchless_nb.learner import Learner, Callback, InitBatchless, StatsTracker, save_json
from batchless_nb.cli import summarize

class _Project(torch.autograd.Function):
    "Identity forward; backward removes from the gradient, per channel, its components along 1 and along x"
    @staticmethod
    def forward(ctx, x, run, mode):
        ctx.save_for_backward(x); ctx.run, ctx.mode = run, mode
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        shape, dims = [1, -1] + [1] * (x.dim() - 2), [0] + list(range(2, x.dim()))
        n = x.numel() // x.shape[1]
        x_mean = x.mean(dims, dtype=torch.float64)
        xc = x - x_mean.to(x.dtype).view(shape)
        moments = torch.stack([g.sum(dims) / n, (g * xc).sum(dims) / n, xc.square().sum(dims) / n]).double()
        moments = torch.cat([moments, x_mean[None]])  # mean(g), cov(g, x), var(x), mean(x)
        if ctx.mode == 'ema':
            ctx.run['sums'] += moments * n; ctx.run['n'] += n
            moments = ctx.run['avg']
        g_mean, cov, var, x_mean = moments
        slope = (cov / var.clamp_min(1e-12)).to(g.dtype)
        return g - g_mean.to(g.dtype).view(shape) - slope.view(shape) * (x - x_mean.to(x.dtype).view(shape)), None, None

class GradientProjection(Callback):
    "Project the gradient reaching every BlN layer's input (mode 'batch', or 'ema' with weight `rate` per step)"
    def __init__(self, mode:str, rate:float=0.01): self.mode, self.rate, self.runs, self.hooks = mode, rate, {}, []

    def before_fit(self, learn):
        for name, m in batchless_modules(learn.model).items():
            run = self.runs[name] = {'avg': torch.zeros(4, m.num_features, dtype=torch.float64),
                                     'sums': torch.zeros(4, m.num_features, dtype=torch.float64), 'n': 0}
            run['avg'][2] = 1.0
            self.hooks.append(m.register_forward_pre_hook(self._hook(run)))

    def _hook(self, run):
        def f(m:BatchlessNorm, args):
            if not (m.training and torch.is_grad_enabled()): return None
            return (_Project.apply(args[0], run, self.mode),)
        return f

    def after_backward(self, learn):  # fold this step's moments into the running averages used by the next steps
        for run in self.runs.values():
            if run['n']:
                run['avg'].lerp_(run['sums'] / run['n'], self.rate)
                run['sums'].zero_(); run['n'] = 0

    def after_fit(self, learn):
        for h in self.hooks: h.remove()

class PreservingInit(InitBatchless):
    "The data-driven init with `preserve_function=True`: gamma, beta set so the network computes what it did before"
    def before_fit(self, learn):
        if learn.step == 0: init_batchless(learn.model, learn.train_dl.dataset.tensors[0][:self.n_samples],
                                           n_samples=self.n_samples, passes=self.passes, preserve_function=True, dropout=False)

PAPER_INIT = lambda **kw: InitBatchless(dropout=False, **kw)  # the init as the paper measures it (these runs predate the new default)

NAT = dict(stats_update='natural', stats_eta=0.01)
REMEDIES = {  # name -> (norm, model options, learner options, init callback or None, extra callbacks, classifier scale)
    'bln-log-channel_sum': ('bln-log', dict(nll_reduction='channel_sum'), {}, PAPER_INIT, [], 1),
    'bln-log-no_init': ('bln-log', {}, {}, None, [], 1),
    'bln-log-stats_lr1e-2': ('bln-log', {}, dict(stats_lr=1e-2), PAPER_INIT, [], 1),
    'bln-log-natural0.1-no_init': ('bln-log', {}, dict(stats_update='natural', stats_eta=0.1), None, [], 1),
    'bln-log-natural0.01-batch_projection': ('bln-log', {}, NAT, PAPER_INIT, [lambda: GradientProjection('batch')], 1),
    'bln-log-natural0.01-ema_projection': ('bln-log', {}, NAT, PAPER_INIT, [lambda: GradientProjection('ema', 0.01)], 1),
    'bln-log-natural0.01-train_mode_init': ('bln-log', {}, NAT, lambda **kw: InitBatchless(dropout=True, **kw), [], 1),
    'bln-log-natural0.01-no_init': ('bln-log', {}, NAT, None, [], 1),
    'bln-log-natural0.01-lr5e-4': ('bln-log', {}, NAT | dict(lr=5e-4), PAPER_INIT, [], 1),
    'none-lr5e-4': ('none', {}, dict(lr=5e-4), None, [], 1),
    'bln-log-natural0.01-fc6x0.1': ('bln-log', {}, NAT, PAPER_INIT, [], 0.1),
    'bln-log-natural0.01-preserve_function': ('bln-log', {}, NAT, PreservingInit, [], 1),
}

def run(out:Path, name:str, data, data_path:str, batch_size=64, epochs=3, seed=0):
    norm, model_kw, learn_kw, init, extra, fc_scale = REMEDIES[name]
    d = out/'cells'/f'{name}-bs{batch_size}-seed{seed}'
    if (d/'metrics.json').exists(): return
    set_seed(seed)
    model = get_model('paper_cnn', norm, input_shape=data.input_shape, n_classes=data.n_classes, **model_kw)
    with torch.no_grad(): model.fc6.weight.mul_(fc_scale)
    cbs = ([StatsTracker()] if norm.startswith('bln') else []) + ([init(n_samples=1000, passes=1)] if init else [])
    learn = Learner(model, dataloaders(data, batch_size=batch_size, seed=seed), cbs=cbs + [f() for f in extra],
                    progress=False, seed=seed, **({'lr': 1e-3} | learn_kw))
    learn.fit(epochs)
    config = dict(dataset='cifar10', model='paper_cnn', norm=norm, batch_size=batch_size, seed=seed, epochs=epochs,
                  remedy=name, init=init is not None, **model_kw, **learn_kw, dropout=None, dtype='float32', sync_bn=False,
                  valid='test', valid_pct=0.2, split_seed=0, data_path=data_path)
    d.mkdir(parents=True, exist_ok=True)
    save_json(config, d/'config.json')
    save_json({'config': config, 'summary': summarize(learn.history), 'history': learn.history}, d/'metrics.json')
    torch.save(learn.model.state_dict(), d/'model.pt')
    s = summarize(learn.history)
    print(f"{name} seed {seed}: final test acc {s['final_val_acc']:.4f} ({s['time_s']:.0f}s)", flush=True)

if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('out', type=Path); p.add_argument('data_path')
    p.add_argument('names', nargs='*', help=f'some of {list(REMEDIES)} (default: all)')
    p.add_argument('--seeds', nargs='+', type=int, default=[0])
    p.add_argument('--batch-sizes', nargs='+', type=int, default=[64])
    a = p.parse_args()
    if set(a.names) - set(REMEDIES): p.error(f"unknown remedies {sorted(set(a.names) - set(REMEDIES))}; choose from {list(REMEDIES)}")
    torch.set_num_threads(1)
    data = get_data('cifar10', valid='test', path=a.data_path)
    for batch_size in a.batch_sizes:
        for seed in a.seeds:
            for name in a.names or REMEDIES: run(a.out, name, data, a.data_path, batch_size, seed=seed)
