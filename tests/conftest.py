import pytest, torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope='module')
def one_thread():
    "Tiny models: one torch thread is fastest, and with other processes on the cores, extra threads spin-wait"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def kernel_calls(monkeypatch):
    "A list that grows by one for every training forward the C++ kernel runs (batchless_nb.kernel)"
    import batchless_nb.norm as norm_mod
    calls, kernel = [], norm_mod.batchless_train_cpp
    monkeypatch.setattr(norm_mod, 'batchless_train_cpp', lambda *args: calls.append(1) or kernel(*args))
    return calls


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
