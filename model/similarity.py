"""Similarity tables kept for an episode, so that a new mask costs a matrix-vector product.

MSANet's correlation is a masked mean, and the prior a masked maximum, over the support's
positions of a similarity between frozen features. During EFTNet's rounds the images stay the
same and only the masks change, so each product ``row vector . support position`` is worth
computing once: a :class:`SimilarityColumns` computes the columns (support positions) a mask
first asks for, in blocks of bounded size, and keeps them within a byte budget shared by all
tables of an episode; past the budget, new columns are computed for that call only (the
direct path's cost).

The reformulation is exact up to float rounding. For a support vector ``v`` under mask value
``m > 0``, the reference normalises ``m v`` by ``|m v| + eps``; as ``m`` is a positive scalar,
``relu(u . (m v) / (|m v| + eps)) = relu(u . v) * m / (m |v| + eps)``, so the mask only enters
through a weight per column. The prior's cosine ``(m v . q) / (|m v| |q| + eps)`` likewise only
needs ``v . q`` and ``|v|``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from model.ops import COSINE_EPS, CORRELATION_EPS, correlation_positions, normalised_prior, resize


# New columns are computed in blocks of at most this many bytes, which bounds the transient memory.
BLOCK_BYTES = 64 * 2**20


class CacheBudget:
    """Bytes that the similarity tables of one episode may still take."""

    def __init__(self, max_bytes: int):
        self.left = max(int(max_bytes), 0)

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` if they fit."""
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True


@dataclass
class _Block:
    positions: Tensor    # [n] column positions
    values: Tensor       # [R, Q, n]


class SimilarityColumns:
    """``transform(rows^T columns) * row_scale`` for fixed ``rows`` [R,C,Q], ``columns`` [C,P]
    and positive ``row_scale`` [R,Q], filled in column by column as masks ask for positions, and
    kept while the budget allows (``transform`` may work in place). A row scale instead of
    normalised rows spares a normalised copy of every row image's features."""

    def __init__(self, rows: Tensor, columns: Tensor, budget: CacheBudget,
                 transform: Optional[Callable[[Tensor], Tensor]] = None, row_scale: Optional[Tensor] = None):
        self.rows_t = rows.transpose(1, 2)                  # [R, Q, C]
        self.columns = columns
        self.budget = budget
        self.transform = transform
        self.row_scale = None if row_scale is None else row_scale[..., None]
        self.cached = torch.zeros(columns.shape[1], dtype=torch.bool, device=columns.device)
        self.kept: list[_Block] = []
        self.bytes_per_column = rows.shape[0] * rows.shape[2] * rows.element_size()

    def blocks(self, positions: Tensor) -> Iterator[_Block]:
        """Blocks of products that cover ``positions`` [P] (bool); blocks may hold other columns too."""
        for block in self.kept:
            if positions[block.positions].any():
                yield block
        new = (positions & ~self.cached).nonzero().flatten()
        step = max(1, BLOCK_BYTES // self.bytes_per_column)
        for start in range(0, new.numel(), step):
            block = _Block(new[start:start + step], self.rows_t @ self.columns[:, new[start:start + step]])
            if self.transform is not None:
                block.values = self.transform(block.values)
            if self.row_scale is not None:
                block.values.mul_(self.row_scale)
            if self.budget.take(block.values.numel() * block.values.element_size()):
                self.kept.append(block)
                self.cached[block.positions] = True
            yield block

    def weighted_sum(self, weights: Tensor) -> Tensor:
        """sum_p table[..., p] * weights[p] over the positions where ``weights`` [P] != 0 -> [R, Q]."""
        total = None
        for block in self.blocks(weights != 0):  # blocks never share a column
            part = block.values @ weights[block.positions]
            total = part if total is None else total + part
        return total if total is not None else self.rows_t.new_zeros(self.rows_t.shape[:2])


def correlation(table: SimilarityColumns, size: torch.Size, column_norm: Tensor, mask: Tensor) -> Tensor:
    """``masked_correlation`` of the table's rows with its column image under ``mask`` [1,1,h,w]
    (chain-resized) at the tap's ``size``; the table holds relu(unit row . raw column) (as
    relu(raw row . raw column) / (|row| + eps)); ``column_norm`` [P] is |v|.
    Returns [R, 1, 1, h, w]."""
    m = mask.flatten()
    keep = correlation_positions(m[None])[0]
    count = keep.sum().clamp(min=1)
    weights = torch.where(keep, m / (m * column_norm + CORRELATION_EPS), 0.0) / count.to(m.dtype)
    corr = table.weighted_sum(weights)
    return corr.reshape(corr.shape[0], 1, 1, *size)


def prior(table: SimilarityColumns, row_norm: Tensor, column_norm: Tensor, mask: Tensor, size: torch.Size,
          out_size: torch.Size) -> Tensor:
    """``cosine_prior`` of the rows against the column image under ``mask`` [1,1,S,S]; the table
    holds raw row . column products, ``row_norm`` [R,Q] and ``column_norm`` [P] their norms.
    Returns [R, 1, 1, *out_size]."""
    m = resize(mask, size).flatten()
    keep = m > 0
    best = table.rows_t.new_full(table.rows_t.shape[:2], float("-inf"))
    for block in table.blocks(keep):
        mp = m[block.positions]
        sim = block.values * mp / ((mp * column_norm[block.positions]) * row_norm[..., None] + COSINE_EPS)
        sim = sim.masked_fill(~keep[block.positions], float("-inf"))
        best = torch.maximum(best, sim.amax(-1))
    return normalised_prior(best[:, None], (m == 0).any().expand(best.shape[0], 1), size, out_size)
