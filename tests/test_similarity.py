"""Similarity tables kept across masks (model/similarity.py) equal the direct computations.

Feature grids are 60 x 60, the size of a 473 px image at output stride 8, with few channels;
masks change from call to call as EFTNet's pseudo masks do, so later calls read kept columns.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import similarity
from model.ops import correlation_positions, cosine_prior, masked_correlation, resize, unit_vectors
from model.similarity import CacheBudget, SimilarityColumns

GRID = 60
IMAGE = 121
CHANNELS = 8


def blob_masks(seed: int, count: int, size: int) -> list[torch.Tensor]:
    """Binary masks [1,1,size,size] of drifting boxes, plus an empty and a full one."""
    g = torch.Generator().manual_seed(seed)
    masks = []
    for i in range(count):
        m = torch.zeros(1, 1, size, size)
        y, x = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
        m[..., y:y + size // 3 + 4 * i, x:x + size // 4 + 3 * i] = 1
        masks.append(m)
    return masks + [torch.zeros(1, 1, size, size), torch.ones(1, 1, size, size)]


def features(seed: int, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.randn(batch, CHANNELS, GRID + 4, GRID + 4, generator=g), 5, 1)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("budget_columns", [None, 0, 700])
def test_correlation_equals_the_direct_masked_correlation(rows, budget_columns):
    query, support = features(0, rows), features(1, 1)
    per_column = rows * GRID * GRID * 4
    budget = CacheBudget(10**12 if budget_columns is None else budget_columns * per_column)
    units = unit_vectors(query)
    column = support[0].flatten(1)
    raw = query.flatten(2)
    table = SimilarityColumns(raw, column, budget, torch.relu_, 1 / (raw.norm(dim=1) + 1e-5))
    norm = column.norm(dim=0)
    asked = torch.zeros(GRID * GRID, dtype=torch.bool)
    for full in blob_masks(3, 4, IMAGE):
        mask = resize(full, (GRID, GRID))   # fractional values on the edges, as chained masks have
        cached = similarity.correlation(table, (GRID, GRID), norm, mask)
        direct = masked_correlation(units, support, mask, 1)
        assert cached.shape == direct.shape == (rows, 1, 1, GRID, GRID)
        assert torch.allclose(cached, direct, rtol=1e-5, atol=1e-6)
        asked |= correlation_positions(mask.flatten(1))[0]
    kept = int(table.cached.sum())
    assert sum(b.positions.numel() for b in table.kept) == kept
    assert budget.left == (10**12 if budget_columns is None else budget_columns * per_column) - kept * per_column
    if budget_columns is None:
        assert kept == int(asked.sum())   # every column asked for was computed once and kept
    else:
        assert kept <= budget_columns


@pytest.mark.parametrize("budget_columns", [None, 0, 500])
def test_prior_equals_the_direct_cosine_prior(budget_columns):
    query, support = features(4, 2), features(5, 1)
    budget = CacheBudget(10**12 if budget_columns is None else budget_columns * 2 * GRID * GRID * 4)
    column = support[0].flatten(1)
    table = SimilarityColumns(query.flatten(2), column, budget)
    row_norm = query.flatten(2).norm(dim=1)
    for full in blob_masks(6, 4, IMAGE):
        cached = similarity.prior(table, row_norm, column.norm(dim=0), full, (GRID, GRID), (GRID, GRID))
        direct = cosine_prior(query, support, full[None], (GRID, GRID))
        assert cached.shape == direct.shape == (2, 1, 1, GRID, GRID)
        assert torch.allclose(cached, direct, rtol=1e-5, atol=1e-6)


def test_budget_is_shared_and_never_exceeded():
    budget = CacheBudget(1000)
    assert budget.take(900) and budget.left == 100
    assert not budget.take(101) and budget.left == 100
    assert budget.take(100) and budget.left == 0
    assert not CacheBudget(-5).take(1)


def test_new_columns_come_in_bounded_blocks(monkeypatch):
    monkeypatch.setattr(similarity, "BLOCK_BYTES", 100 * GRID * GRID * 4)   # 100 columns of one row image
    query, support = features(7, 1), features(8, 1)
    table = SimilarityColumns(unit_vectors(query), support[0].flatten(1), CacheBudget(250 * GRID * GRID * 4),
                              torch.relu_)
    asked = torch.zeros(GRID * GRID, dtype=torch.bool)
    asked[:330] = True
    sizes = [b.positions.numel() for b in table.blocks(asked)]
    assert sizes == [100, 100, 100, 30]
    assert [b.positions.numel() for b in table.kept] == [100, 100, 30]   # the third block did not fit
    assert int(table.cached.sum()) == 230 and table.budget.left == 20 * GRID * GRID * 4
    again = [b.positions.numel() for b in table.blocks(asked)]
    assert again == [100, 100, 30, 100]          # kept blocks are read; only the 100 others recomputed
    assert len(table.kept) == 3
