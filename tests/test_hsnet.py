"""HSNet (model/hsnet.py) against dense re-implementations of Min et al.'s HSNet, written here.

The parameter-free parts (the center-pivot 4-D convolution, the hypercorrelation, the K-shot
vote) are compared with per-item computations in float64; the model with random weights
(its last decoder layer scaled so that the logits depend visibly on the inputs) is checked for
its K-shot answer, its released key layout and EFTNet's fine-tuning rounds.
"""
from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from model.eftnet import EFTNet, EFTNetSettings
from model.base import FewShotModel, ShotTable
from model.hsnet import LEVELS, CenterPivotConv4d, FeatureStack, HSNet, Hypercorrelation, vote
from model.similarity import CacheBudget
from tests.synthetic import SIZE, make_episode

CORRELATION_EPS = 1e-5
MANIFESTS = Path(__file__).resolve().parents[2] / "shared" / "checkpoint_keys"
MANIFEST_BACKBONES = {"resnet50": "resnet50", "resnet101": "resnet101", "vgg16": "vgg"}


pytestmark = pytest.mark.usefixtures("one_thread")


def spread_logits(model: HSNet, episode: tuple[Tensor, Tensor, Tensor]) -> HSNet:
    """Scale the last decoder layer (random heads give near-constant logits) and centre the
    foreground margin at its median on ``episode``'s one-shot predictions."""
    last = model.hpn_learner.decoder2[-1]
    with torch.no_grad():
        last.weight.mul_(10.0)
        last.bias.zero_()
        query, supports, masks = episode
        meta = model(query, supports[:, :1], masks[:, :1]).meta
        last.bias.copy_(torch.tensor([0.0, -float((meta[:, 1] - meta[:, 0]).median())]))
    return model


def majority(argmaxes: Tensor) -> Tensor:
    """HSNet's K-shot rule on per-shot argmaxes [B,K,...]: the votes divided by the image's
    largest vote (at least 1), foreground from 0.5."""
    votes = argmaxes.sum(1).double()
    largest = votes.flatten(1).max(1).values.clamp(min=1.0)
    return (votes / largest.view(-1, *[1] * (votes.dim() - 1)) >= 0.5).long()


# ---- 1. the center-pivot 4-D convolution ------------------------------------------------------
def dense_center_pivot(x: Tensor, conv: CenterPivotConv4d, stride: int) -> Tensor:
    """out[b,o,i,j,k,l] = conv1 over the query window at support position (k*s, l*s) +
    conv2 over the support window centred at (k*s, l*s) at query position (i, j), zero padded."""
    w1, b1, w2, b2 = conv.conv1.weight, conv.conv1.bias, conv.conv2.weight, conv.conv2.bias
    batch, _, hq, wq, hs, ws = x.shape
    kernel = w1.shape[-1]
    pad = kernel // 2
    xp = F.pad(x, (pad,) * 8)
    rows, cols = range(0, hs, stride), range(0, ws, stride)
    out = x.new_zeros(batch, w1.shape[0], hq, wq, len(rows), len(cols))
    for i in range(hq):
        for j in range(wq):
            for k, y in enumerate(rows):
                for l, z in enumerate(cols):
                    query_window = xp[:, :, i:i + kernel, j:j + kernel, y + pad, z + pad]
                    support_window = xp[:, :, i + pad, j + pad, y:y + kernel, z:z + kernel]
                    out[:, :, i, j, k, l] = (torch.einsum("ocuv,bcuv->bo", w1, query_window) + b1
                                             + torch.einsum("ocuv,bcuv->bo", w2, support_window) + b2)
    return out


@pytest.mark.parametrize("kernel, stride", [(3, 1), (3, 2), (5, 2), (5, 4)])
def test_center_pivot_conv4d_matches_dense_definition(kernel: int, stride: int):
    torch.manual_seed(kernel * 10 + stride)
    conv = CenterPivotConv4d(3, 4, kernel, stride).double()
    x = torch.randn(2, 3, 5, 4, 7, 6, dtype=torch.float64)
    out = conv(x)
    expected = dense_center_pivot(x, conv, stride)
    assert out.shape == (2, 4, 5, 4, -(-7 // stride), -(-6 // stride))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# ---- 2. the hypercorrelation ----------------------------------------------------------------
def random_taps(batch: int, levels: tuple[int, int, int], sizes: list[tuple[int, int]], seed: int) -> list[Tensor]:
    """Random float64 block maps, level by level, with per-position scales from 1e-5 to 1 (so
    that the 1e-5 in the normalisation matters); block n has 3 + n % 5 channels."""
    g = torch.Generator().manual_seed(seed)
    taps = []
    for count, (h, w) in zip(levels, sizes):
        for _ in range(count):
            channels = 3 + len(taps) % 5
            scale = 10.0 ** (-5 * torch.rand(batch, 1, h, w, generator=g, dtype=torch.float64))
            taps.append(torch.randn(batch, channels, h, w, generator=g, dtype=torch.float64) * scale)
    return taps


def stack(taps: list[Tensor]) -> FeatureStack:
    """Block maps as ``extract`` would return them for SIZE-pixel images."""
    return FeatureStack(taps, (SIZE, SIZE))


def dense_hypercorrelation(query: list[Tensor], support: list[Tensor], masks: Tensor,
                           levels: tuple[int, int, int]) -> list[Tensor]:
    """Each (query, shot) pair and block alone -> [l2, l3, l4], each [B, K, blocks, hq, wq, hs, ws]."""
    bs, shots = masks.shape[:2]
    per_block = []
    for q_tap, s_tap in zip(query, support):
        pairs = []
        for b in range(q_tap.shape[0]):
            row = []
            for k in range(shots):
                owner = b if bs > 1 else 0
                fg = (masks[owner, k] == 1).double()[None, None]
                mask = F.interpolate(fg, s_tap.shape[-2:], mode="bilinear", align_corners=True)[0]
                supp = s_tap[owner * shots + k] * mask
                supp = supp / (supp.norm(dim=0) + CORRELATION_EPS)
                qry = q_tap[b] / (q_tap[b].norm(dim=0) + CORRELATION_EPS)
                row.append(torch.einsum("cij,ckl->ijkl", qry, supp).clamp(min=0))
            pairs.append(torch.stack(row))
        per_block.append(torch.stack(pairs))
    n2, n3, _ = levels
    return [torch.stack(per_block[:n2], 2), torch.stack(per_block[n2:n2 + n3], 2),
            torch.stack(per_block[n2 + n3:], 2)]


def support_masks(bs: int, shots: int, seed: int) -> Tensor:
    """[Bs, K, 17, 17] masks with a random box of 1 and a random band of 255 each."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(bs, shots, 17, 17, dtype=torch.long)
    for m in masks.flatten(0, 1):
        y, x = (int(v) for v in torch.randint(0, 9, (2,), generator=g))
        m[y:y + 8, x:x + 8] = 1
        band = int(torch.randint(0, 14, (1,), generator=g))
        m[band:band + 3] = 255
    return masks


@pytest.fixture(scope="module")
def meta_models() -> dict[str, HSNet]:
    """Full-size models on the meta device (no weights): ``match`` and the key layout only."""
    with torch.device("meta"):
        return {backbone: HSNet(backbone) for backbone in ("resnet50", "resnet101", "vgg")}


@torch.no_grad()
@pytest.mark.parametrize("backbone", ["vgg", "resnet50"])
def test_match_matches_dense_hypercorrelation(meta_models: dict[str, HSNet], backbone: str):
    model = meta_models[backbone]
    levels = LEVELS[backbone]
    query = random_taps(2, levels, [(5, 4), (3, 2), (2, 1)], seed=1)
    support = random_taps(4, levels, [(6, 5), (3, 3), (2, 2)], seed=2)
    masks = support_masks(2, 2, seed=3)
    masks[1, 0] = 255                                                    # no foreground at all
    stats = model.match(stack(query), stack(support), masks)
    l2, l3, l4 = dense_hypercorrelation(query, support, masks, levels)
    assert stats.corr_l2.shape == (2, 2, levels[0], 5, 4, 6, 5)
    assert stats.corr_l3.shape == (2, 2, levels[1], 3, 2, 3, 3)
    assert stats.corr_l4.shape == (2, 2, levels[2], 2, 1, 2, 2)
    for name, expected in (("corr_l2", l2), ("corr_l3", l3), ("corr_l4", l4)):
        torch.testing.assert_close(getattr(stats, name), expected, rtol=1e-6, atol=1e-9, msg=name)
    assert stats.corr_l2[1, 0].abs().max() == 0
    assert stats.corr_l2[0, 0].max() > 0.5 and (stats.corr_l2[0, 0] == 0).any()   # clamped, not empty

    without_ignore = masks.masked_fill(masks == 255, 0)                  # 255 reads as background
    plain = model.match(stack(query), stack(support), without_ignore)
    for name in ("corr_l2", "corr_l3", "corr_l4"):
        assert torch.equal(getattr(stats, name), getattr(plain, name)), name


@torch.no_grad()
def test_match_with_supports_shared_by_the_queries(meta_models: dict[str, HSNet]):
    model = meta_models["vgg"]
    levels = LEVELS["vgg"]
    query = random_taps(2, levels, [(4, 4), (2, 2), (1, 1)], seed=4)
    support = random_taps(3, levels, [(4, 4), (2, 2), (1, 1)], seed=5)
    masks = support_masks(1, 3, seed=6)
    shared = model.match(stack(query), stack(support), masks)
    repeated = [t.repeat(2, 1, 1, 1) for t in support]
    each = model.match(stack(query), stack(repeated), masks.expand(2, -1, -1, -1))
    dense = dense_hypercorrelation(query, support, masks, levels)
    for name, expected in zip(("corr_l2", "corr_l3", "corr_l4"), dense):
        assert getattr(shared, name).shape[:2] == (2, 3)
        torch.testing.assert_close(getattr(shared, name), getattr(each, name), rtol=1e-12, atol=1e-15, msg=name)
        torch.testing.assert_close(getattr(shared, name), expected, rtol=1e-6, atol=1e-9, msg=name)
    assert not torch.allclose(shared.corr_l2[0], shared.corr_l2[1])      # the two queries differ


# ---- 3. the K-shot vote -----------------------------------------------------------------------
def logits_of(argmaxes: Tensor, seed: int) -> Tensor:
    """Per-shot logits [B,K,2,...] whose argmax over the classes is ``argmaxes`` [B,K,...], with
    margins from 0.01 to 100 (the vote must read the argmax only)."""
    g = torch.Generator().manual_seed(seed)
    background = torch.randn(argmaxes.shape, generator=g)
    margin = 10.0 ** (4 * torch.rand(argmaxes.shape, generator=g) - 2)
    return torch.stack([background, background + (2 * argmaxes - 1) * margin], 2)


def shots_with_counts(counts: list[list[int]], shots: int) -> Tensor:
    """Per-shot argmaxes [B,K,2,3] where pixel p of image b has ``counts[b][p]`` shots voting
    foreground (the first ones)."""
    votes = torch.tensor(counts)
    return torch.stack([(votes > k).long() for k in range(shots)], 1).view(len(counts), shots, 2, 3)


@pytest.mark.parametrize("shots, counts, expected", [
    (4, [[4, 3, 2, 1, 0, 0],        # largest 4: two votes are exactly half -> foreground
         [2, 1, 0, 1, 0, 0],        # largest 2: one vote is half
         [0, 0, 0, 0, 0, 0],        # no votes at all: all background
         [3, 2, 1, 1, 0, 0],        # largest 3: 2/3 in, 1/3 out
         [0, 0, 1, 0, 0, 0]],       # a single vote is the largest
     [[1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]]),
    (3, [[3, 2, 1, 0, 0, 0], [2, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]],
     [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]),
    (2, [[2, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]],
     [[1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]),
])
def test_vote_by_hand(shots: int, counts: list[list[int]], expected: list[list[int]]):
    argmaxes = shots_with_counts(counts, shots)
    scores = vote(logits_of(argmaxes, seed=shots))
    assert scores.shape == (len(counts), 2, 2, 3)
    assert torch.equal(scores.argmax(1), torch.tensor(expected).view(-1, 2, 3))
    assert torch.equal(majority(argmaxes), torch.tensor(expected).view(-1, 2, 3))


@pytest.mark.parametrize("shots", [2, 3, 4, 5])
def test_vote_equals_hsnet_rule_on_random_shots(shots: int):
    g = torch.Generator().manual_seed(shots)
    argmaxes = (torch.rand(6, shots, 5, 5, generator=g) < torch.rand(6, 1, 1, 1, generator=g) * 0.6).long()
    argmaxes[0] = 0
    scores = vote(logits_of(argmaxes, seed=shots))
    assert torch.equal(scores.argmax(1), majority(argmaxes))
    assert scores.argmax(1)[0].max() == 0


# ---- 4. the model's forward -------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_shot() -> tuple[HSNet, tuple[Tensor, Tensor, Tensor]]:
    """A three-shot ResNet-50 HSNet with spread logits and a two-query, three-shot episode."""
    episode = make_episode(20, batch=2, shot=3)
    torch.manual_seed(0)
    return spread_logits(HSNet("resnet50", shot=3).eval(), episode), episode


@torch.no_grad()
def test_one_shot_forward_is_the_learner_logits_at_image_size(three_shot):
    model, (query, supports, masks) = three_shot
    seen: list[Tensor] = []
    handle = model.hpn_learner.register_forward_hook(lambda module, inputs, out: seen.append(out))
    try:
        pred = model(query, supports[:, :1], masks[:, :1])
    finally:
        handle.remove()
    assert pred.final.shape == (2, 2, SIZE, SIZE) and pred.base is None
    assert torch.equal(pred.final, pred.meta)
    assert seen[0].shape[-1] < SIZE
    torch.testing.assert_close(pred.meta, F.interpolate(seen[0], (SIZE, SIZE), mode="bilinear", align_corners=True))
    label = pred.final.argmax(1)
    assert 0.05 < label.float().mean() < 0.95                            # both classes are predicted


@torch.no_grad()
def test_three_shot_forward_votes_the_one_shot_predictions(three_shot):
    model, (query, supports, masks) = three_shot
    pred = model(query, supports, masks)
    singles = [model(query, supports[:, k:k + 1], masks[:, k:k + 1]) for k in range(3)]
    argmaxes = torch.stack([p.final.argmax(1) for p in singles], 1)     # [B, 3, S, S]
    assert pred.final.shape == pred.meta.shape == (2, 2, SIZE, SIZE)
    assert torch.equal(pred.final.argmax(1), majority(argmaxes))
    torch.testing.assert_close(pred.meta, torch.stack([p.meta for p in singles]).mean(0))
    disagree = argmaxes.amax(1) != argmaxes.amin(1)
    assert disagree.float().mean() > 0.01                                # the shots really differ
    assert not torch.equal(pred.final.argmax(1), pred.meta.argmax(1))   # the vote is not the mean


@torch.no_grad()
def test_a_memory_budget_splits_the_pairs_without_changing_the_outputs(three_shot):
    model, (query, supports, masks) = three_shot
    whole = model(query, supports, masks)
    stats = model.match(model.extract(query), model.extract(supports.flatten(0, 1)), masks)
    per_pair = 4 * sum(t[0, 0].numel() for t in (stats.corr_l4, stats.corr_l3, stats.corr_l2)) * 4 / 2**20  # MB
    try:
        for budget, groups in ((2.5 * per_pair, 2), (0.1 * per_pair, 1)):  # 6 pairs: 3 passes of 2, 6 of 1
            model.pass_mb = budget
            assert model.pairs_per_pass(model.extract(query), 6) == groups
            split = model(query, supports, masks)
            torch.testing.assert_close(split.meta, whole.meta, rtol=1e-5, atol=1e-6)
            assert torch.equal(split.final.argmax(1), whole.final.argmax(1))
    finally:
        model.pass_mb = 0


@torch.no_grad()
def test_split_passes_hold_one_pass_input_at_a_time(three_shot):
    """Without gradients, a pass's input is made when the pass runs and is gone before the next."""
    model, (query, supports, masks) = three_shot
    stats = model.match(model.extract(query), model.extract(supports.flatten(0, 1)), masks)
    alive: list[weakref.ref] = []

    class Watched:
        pairs = stats.pairs

        @staticmethod
        def levels(start: int, stop: int) -> list[Tensor]:
            assert all(ref() is None for ref in alive)                  # the previous pass's input is freed
            out = [t.clone() for t in stats.levels(start, stop)]
            alive.extend(weakref.ref(t) for t in out)
            return out

    try:
        model.pass_mb = 1e-3                                             # one pair per pass: 6 passes
        streamed = model.decode(model.extract(query), Watched())
    finally:
        model.pass_mb = 0
    assert len(alive) == 6 * 3
    torch.testing.assert_close(streamed.meta, model.decode(model.extract(query), stats).meta, rtol=1e-5, atol=1e-6)


def test_blended_guidance_is_the_fieldwise_mix_pass_by_pass():
    """EFTNet's blend of a [B, K] table with a [B, 1] one, computed for any range of pairs."""
    g = torch.Generator().manual_seed(3)

    def table(k: int) -> Hypercorrelation:
        return Hypercorrelation(*(torch.rand(2, k, n, 3, 3, 2, 2, generator=g) for n in (1, 2, 3)))

    real, same = table(3), table(1)
    blended = real.blend(same, (0.8, 0.2))
    for start, stop in ((0, 6), (2, 5), (5, 6)):
        for got, r, s in zip(blended.levels(start, stop), (real.corr_l4, real.corr_l3, real.corr_l2),
                             (same.corr_l4, same.corr_l3, same.corr_l2)):
            assert torch.equal(got, (r * 0.8 + s * 0.2).flatten(0, 1)[start:stop])


def test_the_s2q_table_read_pass_by_pass_equals_the_copied_one():
    """The query in each support's slot of a [K, K] table, then blended, as ShotTable computes it."""
    g = torch.Generator().manual_seed(4)
    table = Hypercorrelation(*(torch.rand(3, 3, n, 3, 3, 2, 2, generator=g) for n in (1, 2, 3)))
    query = Hypercorrelation(*(torch.rand(3, 1, n, 3, 3, 2, 2, generator=g) for n in (1, 2, 3)))
    copied = ShotTable.replace_diagonal(table, query)
    lazy = table.replace_diagonal(query)
    for start, stop in ((0, 9), (3, 7), (8, 9)):
        expected = [t.flatten(0, 1)[start:stop] for t in (copied.corr_l4, copied.corr_l3, copied.corr_l2)]
        assert all(torch.equal(a, b) for a, b in zip(lazy.levels(start, stop), expected))
        mixed = lazy.blend(table.diagonal(), (0.8, 0.2)).levels(start, stop)
        eager = ShotTable.replace_diagonal(table, query)
        own = table.diagonal()
        for got, r, d in zip(mixed, (eager.corr_l4, eager.corr_l3, eager.corr_l2), (own.corr_l4, own.corr_l3, own.corr_l2)):
            assert torch.equal(got, (r * 0.8 + d * 0.2).flatten(0, 1)[start:stop])


def test_split_passes_give_the_same_gradients(three_shot):
    """With gradients, split passes are recomputed in the backward: same loss, same gradients."""
    model, (query, supports, masks) = three_shot
    label = masks[:, 0]

    def gradients(budget: float) -> tuple[float, list[Tensor]]:
        model.pass_mb = budget
        model.zero_grad()
        loss = F.cross_entropy(model(query, supports, masks).meta, label, ignore_index=255)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.hpn_learner.parameters()]

    try:
        whole_loss, whole = gradients(0)
        split_loss, split = gradients(1e-3)                             # one pair per pass
    finally:
        model.pass_mb = 0
        model.zero_grad()
    assert split_loss == pytest.approx(whole_loss, rel=1e-6)
    for a, b in zip(split, whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in whole)


# ---- 5. the released key layout ------------------------------------------------------------------
@pytest.mark.skipif(not MANIFESTS.is_dir(),
                    reason=f"no manifests at {MANIFESTS} (the shared/ folder beside the repository)")
@pytest.mark.parametrize("name", sorted(MANIFEST_BACKBONES))
def test_keys_and_shapes_match_released_manifest(meta_models: dict[str, HSNet], name: str):
    model = meta_models[MANIFEST_BACKBONES[name]]
    assert all(p.is_meta for p in model.parameters())
    expected = json.loads((MANIFESTS / f"hsnet_{name}.json").read_text())
    built = {f"module.{k}": list(v.shape) for k, v in model.state_dict().items()}
    unused = {f"module.{k}": list(shape) for k, shape in model.unused_checkpoint_keys().items()}
    assert not built.keys() & unused.keys()
    assert {**built, **unused} == expected


# ---- 6. EFTNet on HSNet ------------------------------------------------------------------------
@pytest.mark.parametrize("shot", [1, 2])
def test_eftnet_rounds_on_hsnet(shot: int):
    episode = make_episode(30 + shot, batch=1, shot=shot)
    torch.manual_seed(shot)
    model = spread_logits(HSNet("mobilenetv2", shot=shot).eval(), episode)
    learner = {k: v.clone() for k, v in model.hpn_learner.state_dict().items()}
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    with torch.no_grad():
        plain = model(*episode)

    moved: list[bool] = []
    last = dict(learner)

    def after_step(optimizer, args, kwargs) -> None:
        """Each step moves the learner and leaves the backbone as it was."""
        now = {k: v.clone() for k, v in model.hpn_learner.state_dict().items()}
        moved.append(any(not torch.equal(v, last[k]) for k, v in now.items()))
        last.update(now)
        assert all(torch.equal(v, backbone[k]) for k, v in model.backbone.state_dict().items())

    handle = register_optimizer_step_post_hook(after_step)
    try:
        result = EFTNet(model, EFTNetSettings(rounds=3)).adapt(*episode)
    finally:
        handle.remove()

    assert len(result.round_scores) == 3 and all(0.0 <= s <= 1.0 for s in result.round_scores)
    assert result.chosen_round in (1, 2, 3)
    assert torch.equal(result.zero_round.final, plain.final) and torch.equal(result.zero_round.meta, plain.meta)
    assert len(result.losses) == 2 and not result.stopped_early and moved == [True, True]
    assert any((r.meta - plain.meta).abs().max() > 1e-3 for r in result.rounds)
    assert any(not torch.equal(r.final.argmax(1), plain.final.argmax(1)) for r in result.rounds)
    after = model.hpn_learner.state_dict()
    assert all(torch.equal(after[k], v) for k, v in learner.items())
    assert all(torch.equal(v, backbone[k]) for k, v in model.backbone.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


class EagerTableHSNet(HSNet):
    """HSNet with the interface's default s2q table: every entry computed at once and kept."""

    support_table = FewShotModel.support_table


def entry_bytes(model: HSNet, supports: Tensor) -> int:
    stats = FewShotModel.support_table(model, model.extract(supports), torch.ones(1, 1, SIZE, SIZE))
    return sum(t[0, 0].numel() * t.element_size() for t in (stats.corr_l4, stats.corr_l3, stats.corr_l2))


@torch.no_grad()
def test_the_support_table_read_entry_by_entry_keeps_what_fits_and_equals_the_whole_one():
    episode = make_episode(41, batch=1, shot=3)
    torch.manual_seed(0)
    model = HSNet("mobilenetv2", shot=3).eval()
    supports = model.extract(episode[1][0])
    whole = FewShotModel.support_table(model, supports, episode[2])
    size = entry_bytes(model, episode[1][0])
    calls: list[int] = []
    match = model.match
    model.match = lambda *args: calls.append(1) or match(*args)
    # 27 reads: (0, 9), (2, 7), (8, 9), (0, 9) and the diagonal. Kept entries are computed once;
    # with room for two, (0, 0) (read 3 times) and (0, 1) (twice) are kept.
    for budget, kept, computed in ((None, 0, 27), (CacheBudget(0), 0, 27), (CacheBudget(int(2.5 * size)), 2, 24),
                                   (CacheBudget(10**12), 9, 9)):
        calls.clear()
        table = model.support_table(supports, episode[2], budget)
        for start, stop in ((0, 9), (2, 7), (8, 9), (0, 9)):
            assert all(torch.equal(a, b) for a, b in zip(table.levels(start, stop), whole.levels(start, stop)))
        assert all(torch.equal(a, b) for a, b in zip(table.diagonal().levels(0, 3), whole.diagonal().levels(0, 3)))
        assert len(table.entries.kept) == kept and len(calls) == computed
        assert budget is None or budget.left >= 0
    model.match = match


@pytest.mark.parametrize("cache_mb", [0, 0.5, 1024])
def test_eftnet_on_hsnet_is_the_same_whatever_the_support_table_may_keep(cache_mb: float):
    """Three shots: the s2q table computed when read (within the budget) gives the same rounds
    as the one computed whole and kept."""
    episode = make_episode(43, batch=1, shot=3)
    torch.manual_seed(3)
    eager = spread_logits(EagerTableHSNet("mobilenetv2", shot=3).eval(), episode)
    lazy = HSNet("mobilenetv2", shot=3).eval()
    lazy.load_state_dict(eager.state_dict())
    assert 1 <= 0.5 * 2**20 // entry_bytes(lazy, episode[1][0]) < 9      # 0.5 MB keeps part of the table
    settings = EFTNetSettings(rounds=3, similarity_cache_mb=cache_mb)
    expected = EFTNet(eager, settings).adapt(*episode)
    got = EFTNet(lazy, settings).adapt(*episode)
    assert got.round_scores == expected.round_scores and got.chosen_round == expected.chosen_round
    assert got.losses == expected.losses
    assert all(torch.equal(a.final, b.final) and torch.equal(a.meta, b.meta) for a, b in zip(got.rounds, expected.rounds))
