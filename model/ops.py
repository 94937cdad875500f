"""Parameter-free support/query operations shared by MSANet and BAM.

Shapes: a query batch ``Bq`` is matched against ``Bs x K`` supports with ``Bs`` equal to
``Bq`` or 1 (one support set shared by every query); results come back as ``[Bq, K, ...]``.
The arithmetic (epsilons, where masks are applied, resize chains) follows the reference
code exactly; only the work is organised differently (batched, masked positions only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

COSINE_EPS = 1e-7
CORRELATION_EPS = 1e-5
GAP_EPS = 0.0005


def resize(x: Tensor, size: tuple[int, int] | torch.Size, mode: str = "bilinear") -> Tensor:
    """Bilinear (align_corners=True, as everywhere in the reference) or nearest resize."""
    if mode == "nearest":
        return F.interpolate(x, size=tuple(size), mode="nearest")
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def weighted_gap(feat: Tensor, mask: Tensor) -> Tensor:
    """Mask-weighted average of ``feat`` [N,C,h,w] under ``mask`` [N,1,h,w] -> [N,C,1,1]."""
    h, w = feat.shape[-2:]
    area = F.avg_pool2d(mask, (h, w)) * h * w + GAP_EPS
    return F.avg_pool2d(feat * mask, (h, w)) * h * w / area


def gram_matrix(feat: Tensor) -> Tensor:
    """Channel-by-channel cosine Gram matrix of [N,C,h,w] -> [N,C,C]."""
    flat = feat.flatten(2)
    norm = flat.norm(2, 2, True)
    return torch.bmm(flat, flat.transpose(1, 2)) / (torch.bmm(norm, norm.transpose(1, 2)) + COSINE_EPS)


def gram_distance(query_gram: Tensor, support_gram: Tensor) -> Tensor:
    """||G_q - G_s||_F / ||ones(C,C)||_F for [Bq,C,C] vs [Bs,K,C,C] -> [Bq,K]."""
    channels = query_gram.shape[-1]
    return (query_gram[:, None] - support_gram).norm(dim=(-2, -1)) / float(channels)


def _shots(x: Tensor, bs: int) -> Tensor:
    """[Bs*K, ...] -> [Bs, K, ...]."""
    return x.reshape(bs, -1, *x.shape[1:])


def gather_positions(feat: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Columns of ``feat`` [N,C,P] where ``keep`` [N,P]; padded to the largest count with zeros.

    Returns ``(kept [N,C,n], count [N])``. Kept positions stay in raster order.
    """
    count = keep.sum(1)
    n = max(int(count.max()), 1)
    if feat.shape[0] == 1:
        return feat[:, :, keep[0]] if count[0] > 0 else feat.new_zeros(1, feat.shape[1], 1), count
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :n]
    kept = feat.gather(2, order[:, None, :].expand(-1, feat.shape[1], -1))
    valid = torch.arange(n, device=feat.device)[None] < count[:, None]
    return kept * valid[:, None, :], count


def cosine_prior(query_l4: Tensor, support_l4: Tensor, masks: Tensor, out_size: torch.Size,
                 query_norm: Tensor | None = None) -> Tensor:
    """PFENet prior: per query position, max cosine to the masked support layer4, min-max normalised.

    ``query_l4`` [Bq,C,h,w], ``support_l4`` [Bs*K,C,h',w'], ``masks`` [Bs,K,1,S,S] float;
    ``query_norm`` [Bq,1,h*w], the channel norms of ``query_l4`` when the caller caches them.
    Only positions with a non-zero mask are compared: a zero-mask position is a zero vector
    whose cosine is exactly 0, so it only matters as a floor of the maximum.
    """
    bs, k = masks.shape[:2]
    m = resize(masks.flatten(0, 1), support_l4.shape[-2:]).flatten(1)             # [Bs*K, P]
    supp = support_l4.flatten(2) * m[:, None]                                      # [Bs*K, C, P]
    kept, count = gather_positions(supp, m > 0)
    kept_norm = kept.norm(2, 1, True)                                              # [Bs*K, 1, n]
    query = query_l4.flatten(2)                                                    # [Bq, C, Q]
    query_norm = query.norm(2, 1, True) if query_norm is None else query_norm
    num = _shots(kept, bs).transpose(-1, -2) @ query[:, None]                      # [B, K, n, Q]
    den = _shots(kept_norm, bs).transpose(-1, -2) @ query_norm[:, None] + COSINE_EPS
    sim = num / den
    valid = torch.arange(sim.shape[-2], device=sim.device)[None] < count[:, None]   # [Bs*K, n]
    sim = sim.masked_fill(~_shots(valid, bs)[..., None], float("-inf")).amax(-2)    # [B, K, Q]
    return normalised_prior(sim, _shots((m == 0).any(1), bs), query_l4.shape[-2:], out_size)


def normalised_prior(sim: Tensor, has_zero: Tensor, size: torch.Size, out_size: torch.Size) -> Tensor:
    """Prior from the best masked-support cosine per query position ``sim`` [B,K,h*w]:
    floored at the zero vectors' cosine 0 where a mask has zeros (``has_zero`` [B,K]),
    min-max normalised per map, resized to ``out_size`` -> [B,K,1,*out_size]."""
    sim = torch.where(has_zero[..., None], sim.clamp(min=0), sim)
    lo, hi = sim.amin(-1, keepdim=True), sim.amax(-1, keepdim=True)
    sim = (sim - lo) / (hi - lo + COSINE_EPS)
    prior = sim.reshape(-1, 1, *size)
    return resize(prior, out_size).reshape(sim.shape[0], sim.shape[1], 1, *out_size)


def chained_masks(masks: Tensor, sizes: list[torch.Size]) -> list[Tensor]:
    """MSANet's mask chain: resize to twice the first map's width, then on to each map's size.

    Each resize starts from the previous result, not from the full-resolution mask, and only
    happens when the width changes (as in the reference).
    """
    first = sizes[0][-1] * 2
    m = resize(masks, (first, first))
    out = []
    for size in sizes:
        if m.shape[-1] != size[-1]:
            m = resize(m, size)
        out.append(m)
    return out


def unit_vectors(tap: Tensor) -> Tensor:
    """[N,C,h,w] -> [N,C,h*w] with each position's channel vector divided by (norm + 1e-5)."""
    flat = tap.flatten(2)
    return flat / (flat.norm(dim=1, keepdim=True) + CORRELATION_EPS)


def correlation_positions(m: Tensor) -> Tensor:
    """Support positions a correlation averages over: mask values [N,P] that are positive and
    at least the mean positive value."""
    positive = m > 0
    mean_positive = (m * positive).sum(1, keepdim=True) / positive.sum(1, keepdim=True).clamp(min=1)
    return positive & (m >= mean_positive)


def masked_correlation(query_unit: Tensor, support_tap: Tensor, mask: Tensor, bs: int) -> Tensor:
    """Mean over selected support vectors of the clamped cosine to each query position.

    ``query_unit`` [Bq,C,h*w] (``unit_vectors`` of the query tap); ``support_tap``
    [Bs*K,C,h,w]; ``mask`` [Bs*K,1,h,w] (already chain-resized). Support positions whose mask
    is >= the mean positive mask value are kept, scaled by their mask value; an empty mask
    gives a zero map. Returns [Bq, K, 1, h, w].
    """
    m = mask.flatten(1)
    keep = correlation_positions(m)
    kept, count = gather_positions(support_tap.flatten(2) * m[:, None], keep)
    kept = kept / (kept.norm(dim=1, keepdim=True) + CORRELATION_EPS)
    corr = (query_unit.transpose(1, 2)[:, None] @ _shots(kept, bs)).clamp(min=0)     # [B, K, Q, n]
    corr = corr.sum(-1) / _shots(count.clamp(min=1), bs)[..., None].to(corr.dtype)
    return corr.reshape(corr.shape[0], corr.shape[1], 1, *support_tap.shape[-2:])
