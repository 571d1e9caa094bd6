"""One intra-op thread for these tests: the simulations run thousands of small tensor ops, and
on the shared 2-core CI machine each parallel op waits for a busy core (measured: 0.35 s alone
against 6.5 s under a load of 3 for 400 bootstrap intervals). Results do not depend on it."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
