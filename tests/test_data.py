"Checks of batchless_nb.data: CIFAR-10 archive reading (real subset and synthetic archives), splits, loaders."
import hashlib, io, pickle, tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from batchless_nb import data as D
from batchless_nb.data import cifar10, dataloaders, digits, gaussian, get_data, split

# The real 10k/2k CIFAR-10 subset lives beside the repository: <repo>/../shared/data/cifar10-subset
SUBSET = Path(__file__).resolve().parents[1].parent/'shared'/'data'/'cifar10-subset'
SUBSET_TGZ = SUBSET/'cifar-10-python.tar.gz'
needs_subset = pytest.mark.skipif(not SUBSET_TGZ.is_file(), reason=f"CIFAR-10 subset not found at {SUBSET_TGZ}")


def _extract(tgz, dest):
    "Extract with tarfile's safe 'data' filter where this Python has it (3.12, and 3.8-3.11 security releases)"
    safe = {'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}
    with tarfile.open(tgz) as tf: tf.extractall(dest, **safe)


@pytest.fixture(scope='module')
def c10():
    if not SUBSET_TGZ.is_file(): pytest.skip(f"CIFAR-10 subset not found at {SUBSET_TGZ}")
    return cifar10(SUBSET_TGZ)


@pytest.fixture(scope='module')
def extracted(tmp_path_factory):
    if not SUBSET_TGZ.is_file(): pytest.skip(f"CIFAR-10 subset not found at {SUBSET_TGZ}")
    root = tmp_path_factory.mktemp('cifar')
    _extract(SUBSET_TGZ, root)
    return root


# --- real subset ------------------------------------------------------------------------------------------------

@needs_subset
def test_subset_shapes_range_counts(c10):
    assert c10.x_train.shape == (10_000, 3, 32, 32) and c10.x_test.shape == (2_000, 3, 32, 32)
    assert c10.x_train.dtype == torch.float32 and c10.y_train.dtype == torch.int64
    for x in (c10.x_train, c10.x_test):
        assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert torch.bincount(c10.y_train, minlength=10).tolist() == [1000] * 10
    assert torch.bincount(c10.y_test, minlength=10).tolist() == [200] * 10
    assert c10.classes[0] == 'airplane' and c10.classes[9] == 'truck'


@needs_subset
def test_subset_archive_and_extracted_dir_identical(c10, extracted):
    for p in (extracted, extracted/'cifar-10-batches-py'):  # folder holding the dir, and the dir itself
        e = cifar10(p)
        for a, b in ((c10.x_train, e.x_train), (c10.y_train, e.y_train), (c10.x_test, e.x_test), (c10.y_test, e.y_test)):
            assert torch.equal(a, b)


@needs_subset
def test_subset_folder_holding_archive(c10):
    assert torch.equal(cifar10(SUBSET).y_train, c10.y_train)


@needs_subset
def test_subset_pixels_match_raw_bytes(c10):
    "Image 0's pixel (c,h,w) is byte c*1024 + h*32 + w of its row, scaled by /127.5 - 1"
    with tarfile.open(SUBSET_TGZ) as tf:
        raw = pickle.load(tf.extractfile('cifar-10-batches-py/test_batch'), encoding='bytes')
    row = torch.from_numpy(np.asarray(raw[b'data'][0], dtype=np.float32))
    assert torch.allclose(c10.x_test[0], (row / 127.5 - 1).view(3, 32, 32))
    assert c10.y_test[:20].tolist() == list(raw[b'labels'][:20])


@needs_subset
def test_subset_split_sizes(c10):
    d = split(c10, valid='split', valid_pct=0.2, seed=0)
    assert (len(d.train), len(d.valid), len(d.test)) == (8000, 2000, 2000)
    assert d.input_shape == (3, 32, 32) and d.n_classes == 10


@needs_subset
def test_download_from_file_url(tmp_path, monkeypatch):
    "download=True fetches, checks the MD5 and then reads the archive (file:// stands in for the network)"
    md5 = hashlib.md5(SUBSET_TGZ.read_bytes()).hexdigest()
    monkeypatch.setattr(D, 'CIFAR10_URL', SUBSET_TGZ.as_uri())
    monkeypatch.setattr(D, 'CIFAR10_MD5', md5)
    s = cifar10(tmp_path/'dl', download=True)
    assert (tmp_path/'dl'/'cifar-10-python.tar.gz').is_file() and len(s.x_test) == 2000
    s = cifar10(tmp_path/'named.tar.gz', download=True)
    assert (tmp_path/'named.tar.gz').is_file() and len(s.x_train) == 10_000


# --- synthetic archives (no subset needed) ----------------------------------------------------------------------

def _batch(data, labels, str_keys=False):
    d = {'data': data, 'labels': labels} if str_keys else {b'data': data, b'labels': labels, b'batch_label': b'x'}
    return pickle.dumps(d, protocol=2)


def _write_tgz(path, files:dict):
    with tarfile.open(path, 'w:gz') as tf:
        for name, raw in files.items():
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}'); info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    return path


def _fake_files(rng):
    "Three training batches (numbered 1, 2, 10: numeric order matters) and a test batch"
    files, truth = {}, {}
    for name, n in (('data_batch_2', 3), ('data_batch_10', 2), ('data_batch_1', 4), ('test_batch', 5)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        files[name], truth[name] = _batch(data, labels, str_keys=name == 'data_batch_10'), (data, labels)
    files['batches.meta'] = pickle.dumps({b'label_names': [b'airplane']})
    return files, truth


def test_fake_archive_layout_and_order(tmp_path):
    files, truth = _fake_files(np.random.default_rng(0))
    s = cifar10(_write_tgz(tmp_path/'c.tar.gz', files))
    order = ['data_batch_1', 'data_batch_2', 'data_batch_10']
    data = np.concatenate([truth[n][0] for n in order])
    expect = torch.from_numpy(data).float().view(-1, 3, 32, 32) / 127.5 - 1
    assert torch.allclose(s.x_train, expect)
    assert s.y_train.tolist() == sum((truth[n][1] for n in order), [])
    assert s.y_test.tolist() == truth['test_batch'][1] and s.x_test.shape == (5, 3, 32, 32)
    # channel-major: red plane first, then green, then blue; rows of 32 pixels
    assert s.x_train[0, 1, 2, 3].item() == pytest.approx(data[0, 1024 + 2*32 + 3] / 127.5 - 1)


def test_fake_extracted_dir(tmp_path):
    files, _ = _fake_files(np.random.default_rng(1))
    tgz = _write_tgz(tmp_path/'c.tar.gz', files)
    _extract(tgz, tmp_path/'x')
    a, b = cifar10(tgz), cifar10(tmp_path/'x')
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


def test_missing_path_error(tmp_path):
    with pytest.raises(FileNotFoundError) as e: cifar10(tmp_path/'nowhere')
    msg = str(e.value)
    assert str(tmp_path/'nowhere') in msg and 'cifar-10-python.tar.gz' in msg and D.CIFAR10_URL in msg
    assert 'download=True' in msg


def test_not_an_archive_error(tmp_path):
    (tmp_path/'data_batch_1').write_bytes(b'not a tar')
    with pytest.raises(ValueError, match="data_batch_1 is not a tar archive"):
        cifar10(tmp_path/'data_batch_1')


def test_missing_test_batch_error(tmp_path):
    files, _ = _fake_files(np.random.default_rng(2))
    del files['test_batch']
    with pytest.raises(FileNotFoundError, match="expected data_batch_1.. and test_batch"):
        cifar10(_write_tgz(tmp_path/'c.tar.gz', files))


def test_malicious_pickle_rejected(tmp_path):
    class Evil:
        def __reduce__(self): return (print, ('pwned',))
    files, _ = _fake_files(np.random.default_rng(3))
    files['data_batch_1'] = pickle.dumps({b'data': Evil(), b'labels': []})
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        cifar10(_write_tgz(tmp_path/'c.tar.gz', files))


def test_download_md5_mismatch_leaves_nothing(tmp_path):
    src = tmp_path/'src.bin'; src.write_bytes(b'hello')
    dest = tmp_path/'out'/'f.bin'
    with pytest.raises(OSError, match="expected 0+: the download is corrupt"):
        D.download_url(src.as_uri(), dest, md5='0' * 32)
    assert not dest.exists() and not list(dest.parent.iterdir())
    assert D.download_url(src.as_uri(), dest, md5=hashlib.md5(b'hello').hexdigest()).read_bytes() == b'hello'


# --- other sources, splits, loaders ------------------------------------------------------------------------------

def test_digits_range_and_scale():
    from sklearn.datasets import load_digits
    s = digits()
    x, _ = load_digits(return_X_y=True)
    assert torch.allclose(s.x_train[0].flatten(), torch.tensor(x[0], dtype=torch.float32) / 8 - 1)
    assert len(s.x_train) + len(s.x_test) == 1797


@pytest.mark.parametrize('shape', [(4,), (2, 3, 3)])
def test_gaussian_truth(shape):
    g = gaussian(n_train=20_000, n_test=10, shape=shape, seed=0)
    x = g.x_train.transpose(0, 1).flatten(1)
    assert torch.allclose(x.mean(1), g.true_mean, atol=0.03)
    assert torch.allclose(x.std(1), g.true_std, rtol=0.02)
    assert g.x_train.shape == (20_000, *shape) and g.y_train.dtype == torch.int64


def test_split_partition_and_determinism():
    g = gaussian(n_train=100, seed=0)
    d1, d2 = split(g, seed=7), split(g, seed=7)
    assert torch.equal(d1.valid.tensors[0], d2.valid.tensors[0])
    rows = torch.cat([d1.train.tensors[0], d1.valid.tensors[0]])
    assert torch.equal(rows[torch.argsort(rows[:, 0])], g.x_train[torch.argsort(g.x_train[:, 0])])
    assert (len(d1.train), len(d1.valid)) == (80, 20)


def test_loader_order_reproducible_over_epochs():
    d = get_data('gaussian', n_train=50)
    def epochs(seed):
        dl = dataloaders(d, batch_size=8, seed=seed).train
        return [torch.cat([y for _, y in dl]) for _ in range(2)]
    a, b = epochs(0), epochs(0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])  # reshuffled each epoch
    torch.manual_seed(123)  # the global generator does not affect a seeded loader
    assert torch.equal(epochs(0)[0], a[0])
