"""Why BlN trails GroupNorm/LayerNorm at small batch sizes, and which statistics update fixes it: the study's runs.

Every run is `batchless_nb.cli.train` (the paper CNN on the CIFAR-10 subset, `--valid test`, 3 epochs, one-pass
init, batch 1-2 on the first 2,000 training images, or every batch size with --train-samples 2000; or the digits
CNN on digits) with the settings of a named method, plus, for the diagnostics, a callback `train` cannot add. Each
run writes OUT/cells/METHOD-bsB-seedS/ (config.json with the method's name, metrics.json, stats.npz, model.pt);
finished runs are skipped. The methods come before the options (--batch-sizes and --seeds take several values):

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python tests/benchmarks/small_batches_study.py OUT METHOD [METHOD ...] \\
        --dataset cifar10 --data-path cifar-10-python.tar.gz --batch-sizes 1 8 --seeds 0 1
    .venv/bin/python tests/benchmarks/small_batches_study.py OUT --recalibrate   # eval-mode statistics, after training

Methods (`METHODS`): the norms `none bn gn ln`; BlN-log with `paper` (Adam trains the statistics, the paper),
`paper<lr>` (the same at the statistics' learning rate lr, e.g. `paper0.0003`; the network's stays 1e-3),
`natural<eta>` (the natural-gradient step with weight eta per step), `samples<eta>` (`SampleEMA`: weight eta per
sample, so eta_b = 1 - (1 - eta)^b per step); the diagnostics `frozen` (statistics fixed after the data-driven
init: `FreezeStats`, no gradient reaches them) and `oracle<k>` (frozen, and every k steps set to the true train-mode moments of 256
training images, one forward: no estimation noise, a lag of at most k steps); any method with the suffix
`-no_init` (no data-driven init) or `-dropout0` (no dropout anywhere).

`--recalibrate` re-measures, for every finished BlN run, the statistics of each layer in eval mode (dropout off,
two passes over 1,000 training images, layer by layer) and records the test accuracy with them in recalibrated.json:
how much the difference between the activations training fits (dropout on) and those inference sees costs.
"""
import argparse, json, re
from pathlib import Path
import torch
from batchless_nb import cli
from batchless_nb.core import set_seed
from batchless_nb.data import get_data, dataloaders
from batchless_nb.init import init_batchless
from batchless_nb.learner import Callback
from batchless_nb.models import get_model
from batchless_nb.norm import batchless_modules

class OracleStats(Callback):
    "Every `every` steps, set each BlN layer's statistics to the train-mode moments of its input over `x` (one forward)"
    order = 5
    def __init__(self, x:torch.Tensor, every:int): self.x, self.every = x, every

    def after_step(self, learn):
        if learn.step % self.every: return
        layers, moments = batchless_modules(learn.model), {}
        def hook(name):
            def f(mod, args):
                x = args[0].detach().movedim(mod.channel_dim, 0).flatten(1).double()
                moments[name] = (x.mean(1), x.var(1, correction=0).sqrt())
            return f
        hs = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]): learn.model(self.x.to(learn.device))
        finally:
            for h in hs: h.remove()
        for n, m in layers.items(): m.set_stats(moments[n][0], moments[n][1].clamp_min(m.eps))

class FreezeStats(Callback):
    "Keep every BlN layer's statistics where the data-driven init (or an `OracleStats`) puts them: no gradient reaches them"
    def before_fit(self, learn):
        for m in batchless_modules(learn.model).values(): m.mean.requires_grad_(False); m.std_parameter.requires_grad_(False)

BLN = dict(norm='bln-log')

def method_settings(name:str) -> tuple[dict, int|None]:
    "`train` settings of method `name`, and the oracle's period (None: no oracle)"
    base, *mods = name.split('-')
    if base in ('none', 'bn', 'gn', 'ln'): kw, oracle = dict(norm=base), None
    elif base == 'paper': kw, oracle = BLN | dict(stats_update='paper'), None
    elif m := re.fullmatch(r'paper([0-9.]+)', base): kw, oracle = BLN | dict(stats_update='paper', stats_lr=float(m[1])), None
    elif base == 'frozen': kw, oracle = BLN | dict(stats_update='paper', freeze=True), None
    elif m := re.fullmatch(r'(natural|samples)([0-9.e-]+)', base): kw, oracle = BLN | dict(stats_update=m[1], stats_eta=float(m[2])), None
    elif m := re.fullmatch(r'oracle(\d+)', base): kw, oracle = BLN | dict(stats_update='paper', freeze=True), int(m[1])
    else: raise ValueError(f"unknown method {name!r}; see the module's docstring")
    for mod in mods:
        if mod == 'no_init': kw['init'] = False
        elif mod == 'dropout0': kw['dropout'] = 0.0
        else: raise ValueError(f"unknown suffix {mod!r} in {name!r}: -no_init or -dropout0")
    return kw, oracle

def protocol(dataset:str, batch_size:int, data_path:str|None, train_samples:int|None=None) -> dict:
    """The study's fixed settings for `dataset` at `batch_size` (CIFAR-10: `train_samples` images, else 2,000 at batch 1-2, all at 8+).
    BlN runs are tested with the statistics as trained (`eval_stats` off, the paper's recipe); --recalibrate adds eval-mode ones"""
    if dataset == 'digits': return dict(dataset='digits', valid='test', epochs=3, threads=1, eval_stats=False)
    return dict(dataset='cifar10', model='paper_cnn', data_path=data_path, valid='test', epochs=3, init_passes=1, threads=1,
                train_samples=train_samples or (2000 if batch_size <= 2 else None), eval_stats=False)

def run(out:Path, method:str, dataset:str, batch_size:int, seed:int, data_path:str|None=None, stats_every:int|None=None,
        train_samples:int|None=None):
    d = out/'cells'/f'{method}-bs{batch_size}-seed{seed}'
    if (d/'metrics.json').exists() and json.loads((d/'metrics.json').read_text())['config'].get('method') == method: return
    kw, oracle = method_settings(method)
    if kw['norm'] == 'bn' and batch_size == 1: return  # batch norm cannot train on one sample
    settings = protocol(dataset, batch_size, data_path, train_samples) | kw | dict(batch_size=batch_size, seed=seed, out=d, progress=False,
                                                                    resume=True, stats_every=stats_every)
    make, extra = cli._callbacks, [FreezeStats()] if settings.pop('freeze', False) else []
    if oracle:
        data = get_data(dataset, valid='test', **({'path': data_path} if dataset == 'cifar10' else {}))
        extra.append(OracleStats(data.train.tensors[0][:256], oracle))
    if extra: cli._callbacks = lambda *a: make(*a) + extra
    try: res = cli.train(**settings)
    finally: cli._callbacks = make
    m = json.loads((d/'metrics.json').read_text())
    m['config']['method'] = method
    (d/'metrics.json').write_text(json.dumps(m, indent=1))
    s = res['summary']
    print(f"{dataset} {method} bs {batch_size} seed {seed}: test acc {s['final_val_acc']:.4f} ({s['time_s']:.0f}s)", flush=True)

@torch.no_grad()
def accuracy(model, dl) -> float:
    model.eval()
    right = sum((model(x).argmax(1) == y).sum().item() for x, y in dl)
    return right / len(dl.dataset)

def recalibrate(out:Path, data_path:str|None):
    "For each finished BlN run: test accuracy as trained and with eval-mode statistics (recalibrated.json)"
    datas = {}
    for f in sorted(out.glob('cells/*/metrics.json')):
        cfg = json.loads(f.read_text())['config']
        dest = f.parent/'recalibrated.json'
        if not cfg['norm'].startswith('bln') or dest.exists() or not (f.parent/'model.pt').exists(): continue
        key = (cfg['dataset'], cfg.get('train_samples'))
        if key not in datas: datas[key] = get_data(cfg['dataset'], valid='test', **({'path': data_path} if cfg['dataset'] == 'cifar10' else {}))
        data = datas[key]
        model = get_model(cfg['model'], cfg['norm'], input_shape=data.input_shape, n_classes=data.n_classes,
                          **({} if cfg.get('dropout') is None else {'dropout': cfg['dropout']}))
        model.load_state_dict(torch.load(f.parent/'model.pt', weights_only=True))
        dl = dataloaders(data, batch_size=256)[1]
        before = accuracy(model, dl)
        set_seed(0)
        init_batchless(model, data.train.tensors[0][:1000], n_samples=1000, passes=2, dropout=False)
        after = accuracy(model, dl)
        dest.write_text(json.dumps({'test_acc': before, 'test_acc_eval_stats': after}))
        print(f"{f.parent.name}: {before:.4f} -> {after:.4f} with eval-mode statistics", flush=True)

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('out', type=Path)
    p.add_argument('methods', nargs='*')
    p.add_argument('--dataset', default='cifar10', choices=['cifar10', 'digits'])
    p.add_argument('--data-path')
    p.add_argument('--batch-sizes', nargs='+', type=int, default=[1])
    p.add_argument('--seeds', nargs='+', type=int, default=[0])
    p.add_argument('--train-samples', type=int, help='CIFAR-10: train on the first N images at every batch size')
    p.add_argument('--stats-every', type=int, help='record the statistics every N steps (default: at epoch ends)')
    p.add_argument('--recalibrate', action='store_true')
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.recalibrate: recalibrate(a.out, a.data_path)
    for m in a.methods: method_settings(m)  # fail early on a typo
    for b in a.batch_sizes:
        for s in a.seeds:
            for m in a.methods: run(a.out, m, a.dataset, b, s, a.data_path, a.stats_every, a.train_samples)
