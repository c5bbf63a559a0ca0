"Checks of batchless_nb.data: CIFAR-10 archive reading (real subset and synthetic archives), splits, loaders."
import hashlib, io, pickle, tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

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


# --- bad data: refused while read, with the file named (issue 14) -----------------------------------------------

N = 4  # images per batch in the synthetic archives below
_GOOD = np.random.default_rng(0).integers(0, 256, size=(N, 3072), dtype=np.uint8)
_LABELS = [0, 9, 3, 5]


def _pickled(obj, protocol=2): return pickle.dumps(obj, protocol=protocol)
def _dict(data=_GOOD, labels=_LABELS, **extra): return _pickled({b'data': data, b'labels': labels, **extra})


def _good_files(**bad):
    "The batches of a small archive, `bad` replacing some of them: {name: pickled bytes}"
    # in the official archive too, test_batch comes before some training batches: a cut after it loses them
    files = {'data_batch_1': _dict(), 'test_batch': _dict(), 'data_batch_2': _dict(), 'batches.meta': _pickled({})}
    return {**files, **bad}


def _tar_bytes(files:dict, mode='w:gz', root='cifar-10-batches-py/'):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, raw in files.items():
            info = tarfile.TarInfo(root + name); info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def _archive(files): return lambda p: _put(p/'cifar-10-python.tar.gz', _tar_bytes(files))
def _put(path, raw): path.write_bytes(raw); return path
def _cut(n): return lambda p: _put(p/'cifar-10-python.tar.gz', _tar_bytes(_good_files())[:n])
def _flip(i): return lambda p: _put(p/'cifar-10-python.tar.gz', _flipped(_tar_bytes(_good_files()), i))
def _flipped(raw, i, x=0xff): return raw[:i] + bytes([raw[i] ^ x]) + raw[i + 1:]


def _end_of_member(k):
    "Byte offset in the plain tar of `_good_files()` just after member `k`'s data and padding"
    with tarfile.open(fileobj=io.BytesIO(_tar_bytes(_good_files(), 'w'))) as tf: m = tf.getmembers()[k]
    return m.offset_data + -(-m.size // 512) * 512


def _as_dir(files):
    def make(p):
        d = p/'cifar-10-batches-py'; d.mkdir()
        for name, raw in files.items(): (d/name).write_bytes(raw)
        return d
    return make


class _Evil:
    def __reduce__(self): return (print, ('pwned',))


_BATCH = 'cifar-10-batches-py/data_batch_1 in {f}'  # how a member of an archive is named in messages
# (what is wrong, how to make it: tmp_path -> the path given to cifar10, the error's type, its expected message
#  with {f} standing for that path); every bad data input of issue 14, and its neighbours
BAD_INPUTS = [
    ("data channels-last, N x 32 x 32 x 3 uint8",
     _archive(_good_files(data_batch_1=_dict(_GOOD.reshape(N, 3, 32, 32).transpose(0, 2, 3, 1)))), D.DataError,
     _BATCH + ": 'data' has shape (4, 32, 32, 3), channels-last (N x 32 x 32 x 3): expected (N, 3072), each row "
     "1024 red, then 1024 green, then 1024 blue values; convert it with data.transpose(0, 3, 1, 2).reshape(len(data), 3072)"),
    ("data float32 in [0, 1]", _archive(_good_files(data_batch_1=_dict(_GOOD / np.float32(255)))), D.DataError,
     _BATCH + ": 'data' has dtype float32: expected uint8 pixel values 0-255 (other dtypes are refused, not cast)"),
    ("data float64 in [0, 255]", _archive(_good_files(data_batch_1=_dict(_GOOD.astype(np.float64)))), D.DataError,
     _BATCH + ": 'data' has dtype float64: expected uint8 pixel values 0-255 (other dtypes are refused, not cast)"),
    ("data int64", _archive(_good_files(data_batch_1=_dict(_GOOD.astype(np.int64)))), D.DataError,
     _BATCH + ": 'data' has dtype int64: expected uint8 pixel values 0-255 (other dtypes are refused, not cast)"),
    ("data N x 3 x 32 x 32", _archive(_good_files(data_batch_1=_dict(_GOOD.reshape(N, 3, 32, 32)))), D.DataError,
     _BATCH + ": 'data' has shape (4, 3, 32, 32): expected (N, 3072) with N >= 1, one row of 3 x 32 x 32 "
     "channel-major pixels per image"),
    ("data rows of 3071 values", _archive(_good_files(data_batch_1=_dict(_GOOD[:, :-1]))), D.DataError,
     _BATCH + ": 'data' has shape (4, 3071): expected (N, 3072) with N >= 1, one row of 3 x 32 x 32 "
     "channel-major pixels per image"),
    ("data flat, one row", _archive(_good_files(data_batch_1=_dict(_GOOD.ravel()))), D.DataError,
     _BATCH + ": 'data' has shape (12288,): expected (N, 3072) with N >= 1, one row of 3 x 32 x 32 "
     "channel-major pixels per image"),
    ("data with no images", _archive(_good_files(data_batch_1=_pickled({b'data': _GOOD[:0], b'labels': []}, 4))),
     D.DataError,
     _BATCH + ": 'data' has shape (0, 3072): expected (N, 3072) with N >= 1, one row of 3 x 32 x 32 "
     "channel-major pixels per image"),
    ("data a list of lists", _archive(_good_files(data_batch_1=_dict(_GOOD.tolist()))), D.DataError,
     _BATCH + ": 'data' is a list: expected a NumPy uint8 array of shape (N, 3072)"),
    ("label 10 (outside 0-9)", _archive(_good_files(data_batch_1=_dict(labels=[0, 10, 3, 5]))), D.DataError,
     _BATCH + ": 1 of 4 labels are outside 0-9 (values 10..10): expected class indices 0-9"),
    ("labels -1 and 255", _archive(_good_files(test_batch=_dict(labels=[-1, 0, 255, 5]))), D.DataError,
     "cifar-10-batches-py/test_batch in {f}: 2 of 4 labels are outside 0-9 (values -1..255): expected class indices 0-9"),
    ("more labels than images", _archive(_good_files(data_batch_1=_dict(labels=_LABELS + [1]))), D.DataError,
     _BATCH + ": 5 labels for 4 images: expected one label per image"),
    ("fewer rows than labels (wrong row count)", _archive(_good_files(data_batch_1=_dict(_GOOD[:3]))), D.DataError,
     _BATCH + ": 4 labels for 3 images: expected one label per image"),
    ("labels floats", _archive(_good_files(data_batch_1=_dict(labels=[0., 1., 2., 3.]))), D.DataError,
     _BATCH + ": 'labels' hold float values: expected ints 0-9"),
    ("labels byte strings", _archive(_good_files(data_batch_1=_dict(labels=[b'cat'] * N))), D.DataError,
     _BATCH + ": 'labels' hold bytes values: expected ints 0-9"),
    ("labels an (N, 1) array", _archive(_good_files(data_batch_1=_dict(labels=np.array(_LABELS)[:, None]))),
     D.DataError, _BATCH + ": 'labels' is an array of shape (4, 1): expected a list of 4 ints 0-9, one per image"),
    ("no 'labels' key", _archive(_good_files(data_batch_1=_pickled({b'data': _GOOD, b'batch_label': b'x'}))),
     D.DataError, _BATCH + " has no 'labels' key: expected 'data' and 'labels', got ['batch_label', 'data']"),
    ("no 'data' key", _archive(_good_files(data_batch_1=_pickled({b'labels': _LABELS}))), D.DataError,
     _BATCH + " has no 'data' key: expected 'data' and 'labels', got ['labels']"),
    ("a CIFAR-100 batch ('fine_labels')",
     _archive(_good_files(data_batch_1=_pickled({b'data': _GOOD, b'fine_labels': _LABELS, b'coarse_labels': _LABELS}))),
     D.DataError, _BATCH + " has no 'labels' key: expected 'data' and 'labels', got ['coarse_labels', 'data', 'fine_labels']"),
    ("pickle of a list, not a dict", _archive(_good_files(data_batch_1=_pickled([_GOOD, _LABELS]))), D.DataError,
     _BATCH + " holds a pickled list: expected a dict with keys 'data' and 'labels'"),
    ("pickle of an array, not a dict", _archive(_good_files(data_batch_1=_pickled(_GOOD))), D.DataError,
     _BATCH + " holds a pickled ndarray: expected a dict with keys 'data' and 'labels'"),
    ("batch that is not a pickle", _archive(_good_files(data_batch_1=b'not a pickle')), D.DataError,
     _BATCH + " is not a readable CIFAR batch (UnpicklingError: invalid load key, 'n'.); get a good copy of "
     "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (or remove this one and pass download=True)"),
    ("pickle that would run code", _archive(_good_files(data_batch_1=_pickled({b'data': _Evil(), b'labels': []}))),
     D.BatchPickleError, _BATCH + " is not a readable CIFAR batch (UnpicklingError: CIFAR batch refers to "
     "__builtin__.print; only NumPy arrays are expected); get a good copy of cifar-10-python.tar.gz from "
     "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (or remove this one and pass download=True)"),
    ("extracted directory, float data in test_batch", _as_dir(_good_files(test_batch=_dict(_GOOD.astype(np.float32)))),
     D.DataError, "{f}/test_batch: 'data' has dtype float32: expected uint8 pixel values 0-255 (other dtypes are "
     "refused, not cast)"),
    ("extracted directory, truncated batch file", _as_dir(_good_files(data_batch_2=_dict()[:-100])), D.DataError,
     "{f}/data_batch_2 is not a readable CIFAR batch (UnpicklingError: pickle data was truncated); get a good copy "
     "of cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (or remove this one and pass download=True)"),
    (".tar.gz cut in the middle", _cut(5000), D.DataError,
     "{f} is truncated or corrupt (EOFError: Compressed file ended before the end-of-stream marker was reached): "
     "expected a complete tar archive; get a good copy of cifar-10-python.tar.gz from "
     "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (or remove this one and pass download=True)"),
    (".tar.gz missing its last byte", _cut(-1), D.DataError,
     "{f} is truncated or corrupt (EOFError: Compressed file ended before the end-of-stream marker was reached): "
     "expected a complete tar archive; get a good copy of cifar-10-python.tar.gz from "
     "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (or remove this one and pass download=True)"),
    (".tar.gz cut to its first 10 bytes", _cut(10), D.DataError,
     "{f} is truncated or corrupt (EOFError: Compressed file ended before the end-of-stream marker was reached): "
     "expected a complete tar archive; get a good copy of "
     "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (or remove this one and pass download=True)"),
    ("empty .tar.gz", _cut(0), D.DataError,
     "{f} is truncated or corrupt (ReadError: empty file): expected a complete tar archive; get a good copy of "
     "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (or remove this one and pass download=True)"),
    (".tar.gz with a byte flipped in its CRC", _flip(-6), D.DataError,
     "{f} is truncated or corrupt (BadGzipFile: CRC check failed 0x"),
    ("plain .tar cut inside a member", lambda p: _put(p/'c.tar', _tar_bytes(_good_files(), 'w')[:3000]), D.DataError,
     "{f} is truncated or corrupt (ReadError: unexpected end of data): expected a complete tar archive; get a good "
     "copy of cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (or remove this one and pass download=True)"),
    ("plain .tar cut between members", lambda p: _put(p/'c.tar', _tar_bytes(_good_files(), 'w')[:_end_of_member(0)]),
     D.DataError, "{f} is truncated or corrupt (EOFError: the archive stops after 1 member(s) without an end-of-archive "
     "block): expected a complete tar archive; get a good copy of cifar-10-python.tar.gz from "
     "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (or remove this one and pass download=True)"),
    ("an HTML error page saved as cifar-10-python.tar.gz",
     lambda p: _put(p/'cifar-10-python.tar.gz', b'<html><body>404 Not Found</body></html>\n' * 20), D.DataError,
     "{f} is truncated or corrupt (ReadError: invalid header): expected a complete tar archive; get a good copy of "
     "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (or remove this one and pass download=True)"),
    ("a text file, not an archive", lambda p: _put(p/'notes.txt', b'not a tar'), D.DataError,
     "{f} is not a tar archive: pass cifar-10-python.tar.gz, its extracted "
     "cifar-10-batches-py/ directory or a folder holding either"),
    ("archive without test_batch", _archive({'data_batch_1': _dict()}), FileNotFoundError,
     "{f} holds batches ['data_batch_1']: expected data_batch_1.. and test_batch; get a good copy of "
     "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (or remove this one and pass download=True)"),
    ("archive holding a batch twice",
     lambda p: _put(p/'c.tar.gz', _tar_bytes({**_good_files(), '../x/data_batch_1': _dict()})),
     D.DataError, "{f} holds data_batch_1 twice (cifar-10-batches-py/data_batch_1 in {f} and "
     "cifar-10-batches-py/../x/data_batch_1 in it)"),
]


@pytest.mark.parametrize('what,make,err,expected', BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_table(tmp_path, what, make, err, expected):
    "Every bad input gets its one-line message, naming the file, and the error type the table says"
    path = make(tmp_path)
    with pytest.raises(err) as e: cifar10(path)
    msg, want = str(e.value), expected.format(f=path)
    assert '\n' not in msg and str(path) in msg
    assert msg == want or (want.endswith('0x') and msg.startswith(want)), f"{what}:\n got {msg}\nwant {want}"
    assert isinstance(e.value, (D.DataError, FileNotFoundError))
    assert isinstance(e.value, ValueError) or err is FileNotFoundError



# --- property tests: malformed archives always get a DataError naming the file ---------------------------------

def _zeros(shape): return np.zeros(shape, np.uint8)
_KEYS = {b'data': _GOOD, b'labels': _LABELS, b'batch_label': b'x'}

_bad_dtype = st.sampled_from(['float16', 'float32', 'float64', 'int8', 'int16', 'int32', 'int64', 'uint16', 'uint32',
                              'uint64', 'bool', 'complex64', 'object']).map(lambda t: _dict(_GOOD.astype(t)))
_bad_shape = st.one_of(
    st.sampled_from([(N, 32, 32, 3), (N, 3, 32, 32), (N, 3071), (N, 3073), (3072,), (N, 1, 3072), (3072, N), ()]),
    st.lists(st.integers(0, 6), min_size=1, max_size=4).map(tuple),
).map(lambda s: _pickled({b'data': _zeros(s), b'labels': [0] * (s[0] if s else N)}, protocol=4))
_bad_label_values = st.lists(st.integers(-2**70, 2**70), min_size=N, max_size=N).filter(
    lambda l: any(not 0 <= v <= 9 for v in l)).map(lambda l: _dict(labels=l))
_bad_label_count = st.lists(st.integers(0, 9), max_size=2 * N).filter(lambda l: len(l) != N).map(lambda l: _dict(labels=l))
_bad_label_types = st.one_of(
    st.lists(st.one_of(st.integers(0, 9), st.floats(), st.text(max_size=2), st.binary(max_size=2), st.none(),
                       st.booleans()), min_size=N, max_size=N).filter(lambda l: any(type(v) is not int for v in l)),
    st.integers(), st.text(max_size=3), st.none(), st.just(np.array(_LABELS)[:, None]), st.just(np.array(_LABELS, float)),
    st.dictionaries(st.integers(0, 3), st.integers(0, 9), max_size=N),
).map(lambda l: _dict(labels=l))
_missing_keys = st.tuples(st.sets(st.sampled_from([b'data', b'labels']), min_size=1),
                          st.sampled_from([None, b'Data', 'label', b'images', 1, b'fine_labels'])).map(
    lambda t: _pickled({**{k: v for k, v in _KEYS.items() if k not in t[0]}, **({t[1]: _GOOD} if t[1] else {})}))
_not_a_dict = st.tuples(st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=5), st.binary(max_size=5),
                                  st.lists(st.integers(), max_size=3), st.just((_GOOD, _LABELS)), st.just(_GOOD),
                                  st.just([_GOOD, _LABELS])), st.integers(2, 5)).map(lambda t: _pickled(*t))
_not_a_pickle = st.one_of(st.binary(max_size=40), st.integers(0, len(_dict()) - 1).map(lambda n: _dict()[:n]))
BAD_BATCHES = st.one_of(_bad_dtype, _bad_shape, _bad_label_values, _bad_label_count, _bad_label_types, _missing_keys,
                        _not_a_dict, _not_a_pickle)


def _refused(path, names:str):
    "cifar10(path) raises a DataError whose one-line message names `names`; never another error, never a result"
    with pytest.raises(Exception) as e: cifar10(path)
    assert isinstance(e.value, D.DataError), f"raw {type(e.value).__name__}: {e.value}"
    msg = str(e.value)
    assert '\n' not in msg and names in msg, msg
    return msg


@settings(max_examples=150, deadline=None)
@given(bad=BAD_BATCHES, which=st.sampled_from(['data_batch_1', 'data_batch_2', 'test_batch']),
       form=st.sampled_from(['tar.gz', 'dir']))
def test_malformed_batches_refused(tmp_path_factory, bad, which, form):
    "Wrong dtypes, shapes, label values / counts / types, missing keys, non-dicts, non-pickles: always a DataError"
    root, files = tmp_path_factory.mktemp('bad'), _good_files(**{which: bad})
    path = _archive(files)(root) if form == 'tar.gz' else _as_dir(files)(root)
    _refused(path, f"cifar-10-batches-py/{which} in {path}" if form == 'tar.gz' else str(path/which))


_VALID = {'gz': _tar_bytes(_good_files()), '': _tar_bytes(_good_files(), 'w')}
with tarfile.open(fileobj=io.BytesIO(_VALID[''])) as _tf:  # where a cut plain tar is most likely to fool a reader:
    _EDGES = {'': [m.offset for m in _tf.getmembers()] + [_tf.offset], 'gz': [len(_VALID['gz']) - 8]}  # headers, end


@pytest.fixture(scope='module')
def valid_source(tmp_path_factory):
    return cifar10(_put(tmp_path_factory.mktemp('ok')/'c.tar.gz', _VALID['gz']))


def _same(a, b): return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ('x_train', 'y_train', 'x_test', 'y_test'))


@settings(max_examples=150, deadline=None)
@given(data=st.data(), comp=st.sampled_from(['gz', '']))
def test_truncated_archive_refused(tmp_path_factory, valid_source, data, comp):
    "A valid .tar.gz cut at any byte is refused as truncated; a plain .tar cut anywhere is refused or reads whole"
    raw = _VALID[comp]
    near = st.sampled_from(_EDGES[comp]).flatmap(lambda e: st.integers(max(e - 600, 0), min(e + 600, len(raw) - 1)))
    cut = data.draw(st.one_of(st.integers(0, len(raw) - 1), near), label='cut')
    path = _put(tmp_path_factory.mktemp('cut')/f'c.tar{"." + comp if comp else ""}', raw[:cut])
    if comp:
        assert "is truncated or corrupt" in _refused(path, str(path))
        return
    try: s = cifar10(path)
    except D.DataError as e: assert '\n' not in str(e) and str(path) in str(e)
    else: assert _same(s, valid_source), f"cut at {cut} of {len(raw)} read as different data"


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_flipped_byte_refused_or_harmless(tmp_path_factory, valid_source, data):
    "A .tar.gz with one byte changed is refused, or (a flip in gzip's header metadata) reads the same data"
    raw = _VALID['gz']
    i, x = data.draw(st.integers(0, len(raw) - 1), label='at'), data.draw(st.integers(1, 255), label='xor')
    path = _put(tmp_path_factory.mktemp('flip')/'c.tar.gz', _flipped(raw, i, x))
    try: s = cifar10(path)
    except (D.DataError, FileNotFoundError) as e: assert '\n' not in str(e) and str(path) in str(e)
    else: assert _same(s, valid_source), f"byte {i} ^ {x} read as different data"


def test_cli_train_refuses_bad_data_before_writing(tmp_path):
    "`batchless-nb train --dataset cifar10` stops on a bad archive before it writes anything to --out"
    from batchless_nb.cli import main
    bad = _archive(_good_files(data_batch_1=_dict(labels=[0, 12, 3, 5])))(tmp_path)
    out = tmp_path/'run'
    with pytest.raises((D.DataError, SystemExit)) as e:
        main(['train', '--dataset', 'cifar10', '--data-path', str(bad), '--out', str(out), '--epochs', '1', '--no-progress'])
    assert not isinstance(e.value, SystemExit) or e.value.code != 0
    assert not out.exists()


if __name__ == '__main__':  # python tests/test_data.py: the table of bad inputs and the message each gets
    import tempfile
    for what, make, err, _ in BAD_INPUTS:
        with tempfile.TemporaryDirectory() as d:
            try: cifar10(make(Path(d)))
            except (D.DataError, FileNotFoundError) as e: print(f"| {what} | {type(e).__name__}: {str(e).replace(d, '<tmp>')} |")
