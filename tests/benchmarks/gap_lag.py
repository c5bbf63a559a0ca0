"""Closing the gap (nbs/92_closing_the_gap.ipynb): how far each trained BlN model's learned statistics are from the true ones, per layer.

For every run directory under the given sweep directories (config.json + model.pt, as `batchless-nb train` writes),
measure on the run's validation data (the test split with --valid test) the true per-channel mean m and std s of each
BlN layer's input, in eval mode (what inference sees) and in train mode (dropout on, what the NLL saw), and write
`lag.json` beside metrics.json: per layer the median over channels of |mu - m| / s and |log(sigma / s)|.

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/gap_lag.py /tmp/gap/cifar-bln [more sweep dirs]
"""
import json, sys
from pathlib import Path
import numpy as np
import torch
from batchless_nb.cli import _build_model
from batchless_nb.data import get_data
from batchless_nb.norm import batchless_modules
from batchless_nb.track import true_stats, layer_stats

def _train_mode_stats(model, x, layers, batch_size=256, seed=0):
    "Per-channel mean and std of each layer's input with the model in train mode (dropout on), seeded"
    sums = {n: [0., 0., 0] for n in layers}
    def hook(name):
        def f(mod, args):
            t = args[0].detach().double().transpose(0, 1).reshape(args[0].shape[1], -1)
            s = sums[name]; s[0] = s[0] + t.sum(1); s[1] = s[1] + t.square().sum(1); s[2] += t.shape[1]
        return f
    hs = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    model.train(); torch.manual_seed(seed)
    try:
        with torch.no_grad():
            for xb in x.split(batch_size): model(xb)
    finally:
        for h in hs: h.remove()
        model.eval()
    out = {}
    for n, (s1, s2, k) in sums.items():
        mean = s1 / k
        out[n] = (mean.numpy(), (s2 / k - mean.square()).clamp_min(0).sqrt().numpy())
    return out

def lag_of(run:Path, data_cache:dict) -> dict:
    cfg = json.loads((run/'config.json').read_text())
    key = (cfg['dataset'], cfg['valid'])
    if key not in data_cache:
        extra = {'path': cfg['data_path']} if cfg['dataset'] == 'cifar10' else {}
        data_cache[key] = get_data(cfg['dataset'], valid=cfg['valid'], valid_pct=cfg['valid_pct'], seed=cfg['split_seed'], **extra)
    data = data_cache[key]
    model = _build_model(cfg, data)
    model.load_state_dict(torch.load(run/'model.pt', weights_only=True))
    layers = batchless_modules(model)
    if not layers: return {}
    x = data.valid.tensors[0]
    ev = true_stats(model, x, n_samples=0)
    tr = _train_mode_stats(model, x, layers)
    res = {}
    for n, m in layers.items():
        mu, sd = layer_stats(m)
        r = {}
        for mode, (tm, ts) in (('eval', (ev[n]['true_mean'], ev[n]['true_std'])), ('train', tr[n])):
            ts = np.maximum(ts, 1e-12)
            r[f'mean_err_{mode}'] = float(np.median(np.abs(mu - tm) / ts))
            r[f'log_std_err_{mode}'] = float(np.median(np.abs(np.log(sd / ts))))
        res[n] = r
    return res

if __name__ == '__main__':
    torch.set_num_threads(1)
    cache = {}
    for d in sys.argv[1:]:
        for run in sorted(Path(d).glob('cells/*')):
            if not (run/'model.pt').exists() or (run/'lag.json').exists(): continue
            lag = lag_of(run, cache)
            if lag:
                (run/'lag.json').write_text(json.dumps(lag, indent=1))
                print(run.name, {n: (round(v['mean_err_eval'], 3), round(v['log_std_err_eval'], 3)) for n, v in lag.items()}, flush=True)
