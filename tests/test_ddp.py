"""Data-parallel training: 2 processes (torchrun, gloo over loopback) end where 1 process with the same global batch ends.

Every process draws the one-process loader's order and trains on its slice of each global batch, so a plain
one-process run (no torchrun) and a torchrun run with 2 processes see the same batches; with per-sample dropout
(the models' default) also the same dropout masks. The 2-process runs also split each local batch into
micro-batches of 8.
"""
import json, os, socket, subprocess, sys
import pytest
import torch
import torch.distributed as dist
from batchless_nb.cli import _build_model
from batchless_nb.data import get_data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _env():
    env = os.environ | {'OMP_NUM_THREADS': '1'}
    if sys.platform == 'linux': env['GLOO_SOCKET_IFNAME'] = 'lo'  # loopback only: no network needed
    return env


def train_cli(nproc, out, *args):
    "`batchless-nb train` in one plain process (nproc=1) or under torchrun with `nproc` processes"
    run = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--master_addr', '127.0.0.1',
           '--master_port', str(free_port())] if nproc > 1 else [sys.executable]
    cmd = run + ['-m', 'batchless_nb.cli', 'train', '--out', str(out), '--no-progress', '--threads', '1', *args]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(out/'model.pt', weights_only=True), json.loads((out/'metrics.json').read_text())['history']


def max_rel_diff(a:dict, b:dict) -> float:
    "The largest difference of two state dicts' tensors, relative to each tensor's largest value"
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)).item() for k in a if a[k].is_floating_point())


def torchrun(nproc, out, *args):
    env = os.environ | {'OMP_NUM_THREADS': '1'}
    if sys.platform == 'linux': env['GLOO_SOCKET_IFNAME'] = 'lo'  # loopback only: no network needed
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--master_addr', '127.0.0.1',
           '--master_port', str(free_port()), '-m', 'batchless_nb.cli', 'sweep', '--model', 'mlp', '--norms', 'none',
           'bln-log', '--stats-update', 'paper', 'natural', '--batch-sizes', '64', '--seeds', '0', '--epochs', '1', '--dtype', 'float64', '--out', str(out), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp('ddp')
    two = torchrun(2, d/'two', '--micro-batch-size', '8')
    torchrun(1, d/'one')
    return d, two


@pytest.mark.parametrize('norm', ['none', 'bln-log', 'bln-log-natural0.1'])
def test_two_processes_equal_one(runs, norm):
    d, _ = runs
    cell = f'cells/{norm}-bs64-seed0'
    one, two = (torch.load(d/k/cell/'model.pt', weights_only=True) for k in ('one', 'two'))
    assert one.keys() == two.keys()
    for k in one:
        assert (one[k] - two[k]).abs().max() <= 1e-9 * one[k].abs().max().clamp_min(1e-30), k
    h1, h2 = (json.loads((d/k/cell/'metrics.json').read_text())['history'] for k in ('one', 'two'))
    for r1, r2 in zip(h1['epochs'], h2['epochs'], strict=True):
        for key in ('train_loss', 'train_nll', 'valid_loss', 'valid_acc', 'train_acc'):
            assert r1[key] == pytest.approx(r2[key], rel=1e-9, abs=1e-12), key
    assert [s['step'] for s in h1['steps']] == [s['step'] for s in h2['steps']]


def test_rank0_writes_once(runs):
    d, two = runs
    assert two.stdout.count('best_val_acc (rows') == 1  # the table is printed by rank 0 only
    rows = json.loads((d/'two'/'results.json').read_text())['rows']
    assert sorted(r['method'] for r in rows) == ['bln-log', 'bln-log/natural0.1', 'none']
    assert not [p for p in (d/'two').rglob('*') if p.name.endswith('.tmp')]


def test_sync_bn_needs_cuda(tmp_path):
    "torch's SyncBatchNorm runs on GPUs only: on CPU --sync-bn says so (BlN needs no sync)"
    if torch.cuda.is_available(): pytest.skip('CUDA present')
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)
    try:
        cfg = dict(model='mlp', norm='bn', dropout=None, dtype='float32', sync_bn=True)
        with pytest.raises(ValueError, match='--sync-bn needs CUDA'): _build_model(cfg, get_data('digits'))
    finally: dist.destroy_process_group()


ARGS = ['--epochs', '2', '--dropout', '0.25', '--batch-size', '64']  # digits_cnn with BlN, shuffled, per-sample dropout


@pytest.fixture(scope='module')
def plain_vs_torchrun(tmp_path_factory):
    "float64: one plain process, two processes, and one process for epoch 1 resumed by two processes for epoch 2"
    d = tmp_path_factory.mktemp('plain')
    one = train_cli(1, d/'one', '--dtype', 'float64', *ARGS)
    two = train_cli(2, d/'two', '--dtype', 'float64', '--micro-batch-size', '8', *ARGS)
    train_cli(1, d/'mixed', '--dtype', 'float64', *ARGS[:1], '1', *ARGS[2:])
    mixed = train_cli(2, d/'mixed', '--dtype', 'float64', '--resume', *ARGS)
    return one, two, mixed


def test_torchrun_reproduces_one_process_float64(plain_vs_torchrun):
    "Shuffled batches, dropout 0.25: 2 processes (micro-batches of 8) end with the parameters of 1, to 1e-12"
    (one, h1), (two, h2), _ = plain_vs_torchrun
    assert max_rel_diff(one, two) <= 1e-12
    for r1, r2 in zip(h1['epochs'], h2['epochs'], strict=True):
        for key in ('train_loss', 'train_nll', 'valid_loss', 'valid_acc', 'train_acc'):
            assert r1[key] == pytest.approx(r2[key], rel=1e-12, abs=1e-12), key


def test_resume_with_another_process_count(plain_vs_torchrun):
    "A checkpoint of 1 process resumed by 2 continues as the 1-process run"
    (one, h1), _, (mixed, h3) = plain_vs_torchrun
    assert max_rel_diff(one, mixed) <= 1e-12
    assert [r['valid_acc'] for r in h3['epochs']] == pytest.approx([r['valid_acc'] for r in h1['epochs']], abs=1e-12)


def test_torchrun_reproduces_one_process_float32(tmp_path):
    "In float32 the same, to float32 rounding (each tensor within a few units of its largest value's last place)"
    one, _ = train_cli(1, tmp_path/'one', *ARGS)
    two, _ = train_cli(2, tmp_path/'two', *ARGS)
    assert max_rel_diff(one, two) <= 2e-6


def test_sample_ema_two_processes_equal_one(tmp_path):
    "stats_update='samples' weighs each step by the global batch (local batch x processes): 2 processes end as 1"
    env = os.environ | {'OMP_NUM_THREADS': '1'}
    if sys.platform == 'linux': env['GLOO_SOCKET_IFNAME'] = 'lo'
    def train(nproc, out, *args):
        cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', '--master_addr', '127.0.0.1',
               '--master_port', str(free_port()), '-m', 'batchless_nb.cli', 'train', '--model', 'mlp', '--norm', 'bln-log',
               '--stats-update', 'samples', '--stats-eta', '0.01', '--batch-size', '64', '--epochs', '1', '--dtype', 'float64',
               '--no-progress', '--out', str(out), *args]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return torch.load(out/'model.pt', weights_only=True)
    one, two = train(1, tmp_path/'one'), train(2, tmp_path/'two', '--micro-batch-size', '8')
    for k in one: assert (one[k] - two[k]).abs().max() <= 1e-9 * one[k].abs().max().clamp_min(1e-30), k
    assert (one['norm1.mean'] != 0).all()  # the statistics did move
