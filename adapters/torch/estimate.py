"""Attention over an exact zone merged with an estimated zone (the clusters not fetched).

A retrieve with ``estimate=`` (``kvtier.Collection.retrieve``) returns, per query row, the
log-sum-exp mass ``lse_z`` of the clusters it did not fetch (each cluster j standing for
n_j keys equal to its mean: ``log sum_j n_j exp(scale q.mean_j)``) and their mass-weighted
mean value ``val_z``. Exact attention over the entries in hand (sinks, window, fetched
clusters, new tokens) gives an output ``out_e`` and a log-sum-exp ``lse_e`` per query row;
the two zones together are the softmax over their union:

    out = (exp(lse_e - m) out_e + exp(lse_z - m) val_z) / (exp(lse_e - m) + exp(lse_z - m)),
    m = max(lse_e, lse_z)

which is exact attention when nothing is left to estimate (``lse_z = -inf``) and stable for
any magnitudes (every exponent is <= 0). Computed in float32 whatever the model's dtype.
"""
from __future__ import annotations

import torch


def exact_attention(q, k, v, scale: float, mask=None):
    """Softmax attention with its log-sum-exp: q [..., T, d], k [..., N, d], v [..., N, dv],
    mask bool broadcastable to [..., T, N] (True: attended) or None. Returns (out [..., T, dv],
    lse [..., T]) in float32."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    return torch.matmul(p, v.float()), lse


def merge(out_e, lse_e, val_z, lse_z):
    """Combines an exact zone (out_e [..., T, dv], lse_e [..., T]) with an estimated one
    (val_z [..., T, dv], lse_z [..., T], -inf where nothing is estimated) by log-sum-exp.
    Returns (out, lse) in float32."""
    lse_e, lse_z = lse_e.float(), lse_z.float()
    m = torch.maximum(lse_e, lse_z)
    a = torch.exp(lse_e - m)
    b = torch.exp(lse_z - m)  # 0 where lse_z is -inf (lse_e is finite: some key is attended)
    den = a + b
    out = (a.unsqueeze(-1) * out_e.float() + b.unsqueeze(-1) * val_z.float()) / den.unsqueeze(-1)
    return out, m + torch.log(den)


def attend(q, k, v, scale: float, mask=None, est_lse: torch.Tensor | None = None,
           est_val: torch.Tensor | None = None):
    """Exact attention over (k, v), merged with the estimated zone when one is given.

    q [..., T, d]; k, v [..., N, d|dv] (broadcast against q's leading dims, e.g. one KV head
    for a GQA group of query heads); est_lse [..., T] and est_val [..., T, dv] per query row.
    Returns out [..., T, dv] in q's dtype."""
    out, lse = exact_attention(q, k, v, scale, mask)
    if est_lse is not None and est_val is not None:
        out, _ = merge(out, lse, est_val.to(out.device), est_lse.to(out.device))
    return out.to(q.dtype)
