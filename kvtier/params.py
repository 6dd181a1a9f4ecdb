"""Argument checks shared by the store, kvtier.estimate and the adapters: every bad
argument raises InvalidArgumentError naming the argument and what was expected."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from kvtier.config import DTYPES, LAYOUTS, METRICS, POLICIES
from kvtier.errors import InvalidArgumentError

DEFAULT_POLICY = "adaptive"


def as_matrix(name: str, x: Any, dim: int, dtype: DTypeLike, allow_1d: bool = True) -> tuple[np.ndarray, bool]:
    """A C-contiguous [n, dim] array of dtype; rejects wrong shapes, non-numbers, NaN/inf."""
    try:
        a = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise InvalidArgumentError(f"{name}: an array of shape (n, {dim}) expected ({e})") from None
    if a.dtype.kind not in "fiu" or a.dtype == np.bool_:
        raise InvalidArgumentError(f"{name}: a numeric array expected, got dtype {a.dtype}")
    one = False
    if a.ndim == 1 and allow_1d:
        a, one = a.reshape(1, -1), True
    if a.ndim != 2 or a.shape[1] != dim:
        raise InvalidArgumentError(f"{name}: shape (n, {dim}) expected, got {tuple(a.shape)}")
    if a.shape[0] == 0:
        raise InvalidArgumentError(f"{name}: at least one row expected, got an empty array")
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(a, dtype=dtype)
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        what = "NaN or inf" if not np.isfinite(a).all() else f"values outside the {dtype} range"
        raise InvalidArgumentError(f"{name}: finite values expected, found {what}")
    return out, one


def positive_int(name: str, v: Any, lo: int = 1, hi: int = 2**31 - 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= int(v) <= hi:
        raise InvalidArgumentError(f"{name}: an integer in [{lo}, {hi}] expected, got {v!r}")
    return int(v)


def new_params(dim, value_dim, dtype, metric, policy, init_cluster_size, max_cluster_size,
                kmeans_iters, seed, nprobe, tau, tau_factor, pending_budget, local_window,
                local_cluster_size, score_temp, colocate_after, layout=None, value_sums=None) -> dict:
    """A new collection's parameters, checked, with None replaced by the defaults."""
    if dim is None:
        raise InvalidArgumentError("dim: required when creating a collection")
    dim = positive_int("dim", dim, 1, 4096)
    value_dim = dim if value_dim is None else positive_int("value_dim", value_dim, 0, 4096)
    dtype = "float16" if dtype is None else dtype
    metric = "ip" if metric is None else metric
    try:
        dt = np.dtype(dtype).name
    except TypeError:
        dt = str(dtype)
    if dt not in DTYPES:
        raise InvalidArgumentError(f"dtype: one of {DTYPES} expected, got {dtype!r}")
    if metric not in METRICS:
        raise InvalidArgumentError(f"metric: one of {METRICS} expected, got {metric!r}")
    policy = DEFAULT_POLICY if policy is None else policy
    if policy not in POLICIES:
        raise InvalidArgumentError(f"policy: one of {POLICIES} expected, got {policy!r}")
    init_cluster_size = positive_int("init_cluster_size", init_cluster_size, 1, 1 << 20)
    max_cluster_size = positive_int("max_cluster_size", max_cluster_size, 2, 1 << 20)
    kmeans_iters = positive_int("kmeans_iters", kmeans_iters, 0, 1000)
    seed = positive_int("seed", seed, 0, 2**63 - 1)
    if nprobe is not None:
        nprobe = positive_int("nprobe", nprobe, 1)
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float))
                            or not math.isfinite(tau) or tau <= 0):
        raise InvalidArgumentError(f"tau: None (derive it) or a finite number > 0 expected, got {tau!r}")
    if isinstance(tau_factor, bool) or not isinstance(tau_factor, (int, float)) \
            or not math.isfinite(tau_factor) or tau_factor <= 0:
        raise InvalidArgumentError(f"tau_factor: a finite number > 0 expected, got {tau_factor!r}")
    pending_budget = positive_int("pending_budget", pending_budget, 0, 1 << 30)
    local_window = positive_int("local_window", local_window, 2, 1 << 24)
    local_cluster_size = positive_int("local_cluster_size", local_cluster_size, 1, local_window)
    if isinstance(score_temp, bool) or not isinstance(score_temp, (int, float)) \
            or not math.isfinite(score_temp) or score_temp < 0:
        raise InvalidArgumentError(f"score_temp: a finite number >= 0 expected, got {score_temp!r}")
    colocate_after = positive_int("colocate_after", colocate_after, 0, 1 << 20)
    layout = "colocated" if layout is None else layout
    if layout not in LAYOUTS:
        raise InvalidArgumentError(f"layout: one of {LAYOUTS} expected, got {layout!r}")
    if layout != "colocated":
        colocate_after = 0
    if value_sums is not None and not isinstance(value_sums, (bool, np.bool_)):
        raise InvalidArgumentError(f"value_sums: True or False expected, got {value_sums!r}")
    return {"dim": dim, "value_dim": value_dim, "dtype": dt, "metric": metric, "policy": policy,
            "init_cluster_size": init_cluster_size, "max_cluster_size": max_cluster_size,
            "kmeans_iters": kmeans_iters, "seed": seed, "nprobe": nprobe,
            "tau": float(tau) if tau is not None else None, "tau_factor": float(tau_factor),
            "pending_budget": pending_budget, "local_window": local_window,
            "local_cluster_size": local_cluster_size, "score_temp": float(score_temp),
            "colocate_after": colocate_after, "layout": layout, "value_sums": bool(value_sums)}


def budget_arg(v: Any, name: str = "budget") -> int | float:
    """A fetch budget as given: a share in [0, 1] (float) or an entry count (int >= 0)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise InvalidArgumentError(
            f"{name}: a share (float in [0, 1]) or an entry count (int >= 0) expected, got {v!r}")
    if isinstance(v, (float, np.floating)):
        if math.isnan(v) or not 0.0 <= v <= 1.0:
            raise InvalidArgumentError(f"{name}: a share in [0, 1] expected, got {v!r}")
        return float(v)
    if v < 0:
        raise InvalidArgumentError(f"{name}: a non-negative entry count expected, got {v!r}")
    return int(v)


def budget_entries(budget: int | float, n: int) -> int:
    """Entries a checked budget (``budget_arg``) allows out of ``n``: an int is a count, a
    float the share ceil(budget * n). ``n`` is what the caller budgets: the entries a
    collection stores for ``Collection.retrieve``, the tokens of the context for the
    adapters (sinks and window included), as the paper states its fetch budget."""
    # a count past any collection (2**70) means "all of it": capped where the engine's 64 bits hold it
    return min(budget, 1 << 62) if isinstance(budget, int) else math.ceil(budget * n)


def flag(name: str, v: Any) -> bool:
    """True or False (numpy's bool too)."""
    if not isinstance(v, (bool, np.bool_)):
        raise InvalidArgumentError(f"{name}: True or False expected, got {v!r}")
    return bool(v)


def one_of(name: str, v: Any, choices: tuple) -> Any:
    """``v`` when it is one of ``choices``."""
    if v not in choices:
        raise InvalidArgumentError(f"{name}: one of {choices} expected, got {v!r}")
    return v


def options(name: str, v: Any) -> dict:
    """A copy of a dict of keyword arguments; None is an empty one."""
    if v is not None and not isinstance(v, dict):
        raise InvalidArgumentError(f"{name}: a dict expected, got {type(v).__name__}")
    return dict(v or {})


def estimate_clusters(v: Any, default: int) -> int | bool | None:
    """The adapters' ``estimate``: False (off), True (``default`` clusters), "all" (None: every
    cluster not fetched) or a cluster count >= 0, as the clusters estimated per retrieve."""
    if isinstance(v, (bool, np.bool_)):
        return default if v else False
    if isinstance(v, str) and v == "all":
        return None
    if isinstance(v, (int, np.integer)) and v >= 0:
        return int(v)
    raise InvalidArgumentError(f"estimate: True, False, 'all' or a cluster count >= 0 expected, got {v!r}")
