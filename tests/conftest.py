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


def torch_adapter_stack():
    """(torch, transformers) for a test module of the torch adapter, or that module skipped with
    the reason: torch or transformers missing, or a transformers other than 5.x (what the
    adapter supports). Call it at the module's top, before importing from either."""
    torch = pytest.importorskip("torch", reason="the torch adapter needs torch")
    transformers = pytest.importorskip("transformers", reason="the torch adapter needs transformers")
    if int(transformers.__version__.split(".")[0]) != 5:
        pytest.skip(f"the torch adapter supports transformers 5.x, found {transformers.__version__}",
                    allow_module_level=True)
    return torch, transformers


def make_data(n, dim=16, value_dim=8, seed=0, dtype=np.float16):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, dim)).astype(dtype)
    values = rng.standard_normal((n, value_dim)).astype(dtype)
    return keys, values


def pytest_terminal_summary(terminalreporter):
    """The reliability counts (kills survived, faults injected, fuzz cases run) that tests
    record with record_property("reliability", ...): shown even under -q."""
    lines = [f"{rep.nodeid.split('::', 1)[-1]}: {value}"
             for key in ("passed", "failed", "xfailed", "xpassed")
             for rep in terminalreporter.stats.get(key, [])
             for name, value in getattr(rep, "user_properties", ()) if name == "reliability"]
    if lines:
        terminalreporter.section("reliability counts")
        for line in lines:
            terminalreporter.write_line(line)
