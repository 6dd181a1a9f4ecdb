import numpy as np
import pytest

import kvtier


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "store"


@pytest.fixture
def store(store_path):
    s = kvtier.open(store_path, dram_budget="16MiB")
    yield s
    s.close()


def make_data(n, dim=16, value_dim=8, seed=0, dtype=np.float16):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, dim)).astype(dtype)
    values = rng.standard_normal((n, value_dim)).astype(dtype)
    return keys, values
