"""Inference cost of the normalization in the paper's CNN: BlN (folded into the preceding layer where it can be) vs
GroupNorm, LayerNorm and none. Time per image, at batch 1 and 64, measured side by side in one run (interleaved
repeats, medians), 1 CPU thread, eval mode; on CUDA too when it exists.

With the paper's placement (conv -> LeakyReLU -> norm) BlN follows the activation, so `fold_batchless` cannot fold
it into the conv: it stays one per-channel affine map (`bln`). With the norm before the activation
(`--norm-position before`: conv -> norm -> LeakyReLU) every BlN layer folds into its conv/linear layer (`bln folded`)
and the network is, at inference, the unnormalized one. GroupNorm (32 groups on the convolutions, one on the dense
layers, as `norm_layer('gn', ...)` builds it) and LayerNorm compute the statistics of every input in both placements.

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_inference.py [--repeats 30] [--batch-sizes 1 64]
"""
import argparse, os, sys
import torch
from batchless_nb.models import get_model
from batchless_nb.convert import fold_batchless
from batchless_nb.norm import batchless_modules
sys.path.insert(0, os.path.dirname(__file__))
from timing import medians  # tests/benchmarks/timing.py, beside this script

def models(position:str, device) -> dict:
    "The paper CNN with each normalization, in eval mode; BlN with non-trivial statistics, also folded"
    torch.manual_seed(0)
    ms = {n: get_model('paper_cnn', n, norm_position=position) for n in ('none', 'gn', 'ln', 'bln-log')}
    for layer in batchless_modules(ms['bln-log']).values():  # statistics and affine as after training (any values do)
        layer.set_stats(torch.randn(layer.num_features) * 0.1, torch.rand(layer.num_features) + 0.5)
        with torch.no_grad(): layer.weight.uniform_(0.5, 1.5); layer.bias.normal_(0, 0.1)
    ms = {k: m.eval().to(device) for k, m in ms.items()}
    folded = get_model('paper_cnn', 'bln-log', norm_position=position).eval().to(device)
    folded.load_state_dict(ms['bln-log'].state_dict())
    x = torch.randn(8, 3, 32, 32, device=device)
    folded, summary = fold_batchless(folded, x, return_summary=True)
    n_folded = len(summary.names('folded'))
    if n_folded: ms['bln folded'] = folded
    return {{'bln-log': 'bln'}.get(k, k): m for k, m in ms.items()}, n_folded

@torch.inference_mode()
def per_image(ms:dict, batch_size:int, repeats:int, device) -> dict[str, float]:
    "Median seconds per image of each model's forward, interleaved over `repeats` rounds"
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    inner = max(1, 64 // batch_size)  # several forwards per timing at batch 1: above the timer's resolution
    forwards = {k: (lambda m=m: [m(x) for _ in range(inner)]) for k, m in ms.items()}
    return {k: t / inner / batch_size for k, t in medians(forwards, repeats, device, warmup=1).items()}

def report(device, batch_sizes, repeats):
    for position in ('after', 'before'):
        ms, n_folded = models(position, device)
        print(f"\n{device.type}, norm {position} the activation ({n_folded} of 5 BlN layers folded): "
              "microseconds per image (ratio to none)")
        print(f"{'batch':>6} " + ' '.join(f'{k:>17}' for k in ms))
        for b in batch_sizes:
            t = per_image(ms, b, repeats, device)
            print(f"{b:>6} " + ' '.join(f"{t[k] * 1e6:9.1f} ({t[k] / t['none']:4.2f}x)" for k in ms), flush=True)

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--repeats', type=int, default=30)
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 64])
    a = p.parse_args()
    torch.set_num_threads(1)
    report(torch.device('cpu'), a.batch_sizes, a.repeats)
    if torch.cuda.is_available(): report(torch.device('cuda'), a.batch_sizes, a.repeats)
    else: print("\n(no CUDA: CPU figures only)")
