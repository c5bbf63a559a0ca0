"""DP-SGD on digits: BlN vs GroupNorm vs no normalization at a few privacy budgets (nbs/94_private_training.ipynb).

Each cell trains the digits CNN (dropout 0) on 1,150 training digits and reports, after the last epoch, the accuracy
on the 288 validation digits (held out of the training set: for choosing the learning rate) and on the 359 test digits
(for the table). One run of this script trains one learning rate (Adam, --lr); the notebook takes, for each norm and
budget, the learning rate with the better mean validation accuracy and shows its test accuracy. Private cells use `private_learner`: Poisson-sampled batches of expected size
--batch-size, each sample's gradient clipped to --max-grad-norm, the noise multiplier that spends epsilon (at
--delta) in --epochs epochs (Opacus's RDP accountant). The 'no DP' cells train the same network with the same
optimizer, batch size and epochs, shuffled batches, no clipping, no noise. No data-driven init anywhere (it would
read the private data without noise): BlN statistics start at mean 0, std 1. Batch norm cannot be trained with
DP-SGD (no per-sample gradients) and is left out.
Writes OUT/results.csv (one row per cell) and OUT/results.json (settings, rows, each run's per-epoch history);
OUT is nbs/results/private/lrLR unless given. Reruns skip the cells already in results.json.
Run (the tutorial's two learning rates, one process each):
  nice -n 15 python tests/benchmarks/private_digits.py --lr 0.003 & nice -n 15 python tests/benchmarks/private_digits.py --lr 0.01
"""
import argparse, csv, json, math, time, warnings
from pathlib import Path
import torch
from torch.utils.data import DataLoader
from batchless_nb.core import set_seed, save_json
from batchless_nb.data import get_data, dataloaders
from batchless_nb.models import get_model
from batchless_nb.callbacks import batchless_learner
from batchless_nb.private import private_learner, dp_callback

warnings.filterwarnings('ignore', message='Secure RNG turned off')
warnings.filterwarnings('ignore', message='Using a non-full backward hook')
FIELDS = ['norm', 'epsilon', 'lr', 'seed', 'noise_multiplier', 'spent_epsilon', 'valid_acc', 'test_acc', 'test_loss',
          'train_loss', 'seconds']


def run_cell(data, norm:str, epsilon:float, seed:int, a) -> dict:
    "Train one cell; its result row and per-epoch history"
    set_seed(seed)
    model = get_model('digits_cnn', norm, input_shape=data.input_shape, dropout=0.0, **a.model_kw)
    dls = dataloaders(data, batch_size=a.batch_size, seed=seed)
    kw = dict(lr=a.lr, progress=False, device='cpu')
    t0 = time.perf_counter()
    if math.isinf(epsilon): learn = batchless_learner(model, dls, **kw)
    else: learn = private_learner(model, dls, target_epsilon=epsilon, epochs=a.epochs, target_delta=a.delta,
                                  max_grad_norm=a.max_grad_norm, **kw)
    learn.fit(a.epochs)
    last, dp = learn.history['epochs'][-1], dp_callback(learn)
    test = learn.validate(DataLoader(data.test, batch_size=512))
    row = dict(norm=norm, epsilon=epsilon, lr=a.lr, seed=seed, noise_multiplier=dp.noise_multiplier if dp else 0.0,
               spent_epsilon=last.get('epsilon', math.inf), valid_acc=last['valid_acc'], test_acc=test['acc'],
               test_loss=test['loss'], train_loss=last['train_loss'], seconds=time.perf_counter() - t0)
    r5 = lambda v: float(f'{v:.5g}') if isinstance(v, float) else v  # the histories: 5 digits are plenty
    hist = [{k: r5(r.get(k)) for k in ('epoch', 'valid_acc', 'valid_loss', 'train_loss', 'epsilon')} for r in learn.history['epochs']]
    return row, hist


def write(out:Path, settings:dict, rows:list, hists:dict):
    save_json({'settings': settings, 'rows': rows, 'histories': hists}, out/'results.json')
    with open(out/'results.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=FIELDS); w.writeheader()
        for r in rows: w.writerow({k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in r.items()})


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', help='default: nbs/results/private/lrLR')
    p.add_argument('--norms', nargs='+', default=['bln-log', 'gn', 'none'])
    p.add_argument('--epsilons', nargs='+', type=float, default=[1.0, 3.0, 8.0, math.inf])
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--epochs', type=int, default=30)
    p.add_argument('--batch-size', type=int, default=128, help='expected batch size (Poisson sampling)')
    p.add_argument('--lr', type=float, default=3e-3, help="Adam's learning rate")
    p.add_argument('--max-grad-norm', type=float, default=1.0)
    p.add_argument('--delta', type=float, default=1e-4, help='below 1 / the 1,438 training samples')
    p.add_argument('--nll-reduction', choices=['mean', 'channel_sum'], default='mean', help="BlN's NLL over channels")
    p.add_argument('--threads', type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    a.model_kw = {} if a.nll_reduction == 'mean' else {'nll_reduction': a.nll_reduction}
    settings = {k: v for k, v in vars(a).items() if k not in ('out', 'norms', 'epsilons', 'seeds', 'threads', 'model_kw')}
    out = Path(a.out or f'nbs/results/private/lr{a.lr:g}'); out.mkdir(parents=True, exist_ok=True)
    old = json.loads((out/'results.json').read_text()) if (out/'results.json').exists() else None
    if old is not None and old['settings'] != settings:
        raise SystemExit(f"{out} holds results made with {old['settings']}; now {settings}: use another --out")
    rows, hists = (old['rows'], old['histories']) if old else ([], {})
    done = {(r['norm'], r['epsilon'], r['seed']) for r in rows}
    data = get_data('digits')  # train 1,150 / valid 288 (split with seed 0) / test 359
    for eps in a.epsilons:
        for norm in a.norms:
            for seed in a.seeds:
                if (norm, eps, seed) in done: continue
                row, hist = run_cell(data, norm, eps, seed, a)
                rows.append(row); hists[f'{norm}/{eps:g}/{seed}'] = hist
                write(out, settings, rows, hists)
                print(f"lr {a.lr:g} {norm:8s} eps {eps:>4g} seed {seed}: sigma {row['noise_multiplier']:.3f}, spent "
                      f"{row['spent_epsilon']:.3f}, valid acc {row['valid_acc']:.4f}, test acc {row['test_acc']:.4f} "
                      f"({row['seconds']:.0f}s)", flush=True)


if __name__ == '__main__': main()
