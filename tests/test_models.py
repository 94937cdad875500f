"""Numerics of the base models (model/backbones.py, ops.py, base.py, msanet.py, bam.py).

Every parameter-free operation is compared with a dense, per-item re-implementation written
here from the reference's description (docs/reference_behaviour.md, section 3), in
float64 so that the epsilons are visible. The models have random weights; their meta
classifier is scaled so that the outputs depend visibly on the supports.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from model import BAM, MSANet
from model.backbones import BACKBONES
from model.base import FewShotModel, Prediction
from model.prototype import Guidance, ShotStats
from model.ops import (chained_masks, cosine_prior, gram_distance, gram_matrix, masked_correlation, resize,
                       unit_vectors, weighted_gap)
from tests.synthetic import SIZE, make_episode

ARCHS = {"MSANet": MSANet, "BAM": BAM}
ADAPTED = ["down_query", "down_supp", "init_merge", "ASPP_meta", "res1_meta", "res2_meta", "cls_meta",
           "gram_merge", "cls_merge"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    """Two-shot models with random weights, built once per (arch, backbone) for this module."""
    built: dict[tuple[str, str], FewShotModel] = {}

    def get(arch: str, backbone: str) -> FewShotModel:
        if (arch, backbone) not in built:
            torch.manual_seed(0)
            model = ARCHS[arch](backbone, 2, 15).eval()
            with torch.no_grad():
                model.cls_meta[3].weight.mul_(50.0)   # random heads give near-constant logits
                model.gram_merge.weight.copy_(torch.tensor([1.0, 0.5]).view(1, 2, 1, 1))
                model.cls_merge.weight.copy_(torch.tensor([1.0, 0.3]).view(1, 2, 1, 1))
            built[arch, backbone] = model
        return built[arch, backbone]

    yield get
    built.clear()


def run_steps(model: FewShotModel, query, support, masks: Tensor):
    """The forward pass through the public steps (match, embed, guide, decode)."""
    embeddings = model.embed(support)
    embeddings = embeddings.reshape(*masks.shape[:2], *embeddings.shape[1:])
    return model.decode(query, model.guide(model.match(query, support, masks), embeddings))


def assert_same_prediction(a, b, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    for name in ("final", "meta", "base"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=rtol, atol=atol, msg=name)


def item(pred: Prediction, i: int) -> Prediction:
    return Prediction(pred.final[i:i + 1], pred.meta[i:i + 1], pred.base[i:i + 1])


def stages_of(model: FewShotModel) -> list[nn.Module]:
    return [model.layer0, model.layer1, model.layer2, model.layer3, model.layer4]


# ---- 1. backbones ---------------------------------------------------------------------------
@torch.no_grad()
def test_resnet50_stage_sizes_at_473(models):
    layers = stages_of(models("MSANet", "resnet50"))
    stages, taps = BACKBONES["resnet50"].run(layers, torch.randn(1, 3, 473, 473), False)
    assert [tuple(s.shape[1:]) for s in stages] == [(128, 119, 119), (256, 119, 119), (512, 60, 60),
                                                    (1024, 60, 60), (2048, 60, 60)]
    assert taps == []


@torch.no_grad()
def test_vgg_stage_and_tap_sizes_at_473(models):
    layers = stages_of(models("MSANet", "vgg"))
    stages, taps = BACKBONES["vgg"].run(layers, torch.randn(1, 3, 473, 473), True)
    assert [tuple(s.shape[1:]) for s in stages] == [(64, 237, 237), (128, 119, 119), (256, 60, 60),
                                                    (512, 30, 30), (512, 30, 30)]
    assert [t.shape[-1] for t in taps] == [60, 60, 60, 30, 30, 30, 30]
    assert all(t.shape[1] == 512 for t in taps)


@pytest.mark.parametrize("backbone", ["resnet50", "resnet101"])
def test_resnet_dilations_and_strides(models, backbone):
    model = models("MSANet", backbone)
    assert [len(layer) for layer in stages_of(model)[1:]] == ([3, 4, 6, 3] if backbone == "resnet50" else [3, 4, 23, 3])
    for layer, dilation in ((model.layer3, 2), (model.layer4, 4)):
        for block in layer:
            assert block.conv2.dilation == (dilation, dilation)
            assert block.conv2.padding == (dilation, dilation)
            assert block.conv2.stride == (1, 1)
        assert layer[0].downsample[0].stride == (1, 1)
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].downsample[0].stride == (2, 2)
    assert all(block.conv2.dilation == (1, 1) for block in [*model.layer1, *model.layer2])
    assert model.layer0[0].stride == (2, 2) and isinstance(model.layer0[-1], nn.MaxPool2d)
    assert model.layer1[0].conv1.in_channels == 128   # deep stem ends with 128 channels


def test_vgg_pools_use_ceil_mode(models):
    layers = stages_of(models("MSANet", "vgg"))
    pools = [m for layer in layers for m in layer if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 4 and all(p.ceil_mode for p in pools)
    assert all(isinstance(layer[-1], nn.MaxPool2d) for layer in layers[:4])
    assert not any(isinstance(m, nn.MaxPool2d) for m in layers[4])   # pool5 dropped


@torch.no_grad()
@pytest.mark.parametrize("backbone, taps, hyper", [("resnet50", 14, 13), ("resnet101", 31, 30), ("vgg", 7, 7)])
def test_tap_counts(models, backbone, taps, hyper):
    model = models("MSANet", backbone)
    assert len(model.extract(torch.randn(1, 3, 41, 41)).taps) == taps
    assert model.hyper_final[0].in_channels == hyper


def stages_with_hooks(layers, x, handles) -> list:
    """A plain stage-by-stage forward (input first) while the hooks record; then remove them."""
    plain = [x]
    for layer in layers:
        plain.append(layer(plain[-1]))
    for h in handles:
        h.remove()
    return plain


@torch.no_grad()
def test_resnet_taps_are_pre_relu_block_outputs(models):
    layers = stages_of(models("MSANet", "resnet50"))
    x = make_episode(0, 1, 1)[0]
    stages, taps = BACKBONES["resnet50"].run(layers, x, True)

    # A plain forward, recording what each block feeds to its last ReLU call (the sum).
    seen: dict[int, list[Tensor]] = {}
    handles = []
    for block in [b for layer in layers[1:] for b in layer]:
        assert isinstance(block, Bottleneck)
        calls = seen.setdefault(id(block), [])
        handles.append(block.relu.register_forward_pre_hook(lambda m, inp, calls=calls: calls.append(inp[0].clone())))
    plain = stages_with_hooks(layers, x, handles)
    for ours, ref in zip(stages, plain[1:]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        assert ours.min() >= 0
    blocks = [layers[1][-1], *layers[2], *layers[3], *layers[4]]
    assert len(taps) == len(blocks) == 14
    for tap, block in zip(taps, blocks):
        torch.testing.assert_close(tap, seen[id(block)][-1], rtol=1e-5, atol=1e-6)
        assert tap.min() < 0
    for stage, last_tap in zip(stages[1:], (taps[0], taps[4], taps[10], taps[13])):
        torch.testing.assert_close(F.relu(last_tap), stage, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_vgg_taps_are_pre_bn_conv_outputs(models):
    layers = stages_of(models("MSANet", "vgg"))
    x = make_episode(0, 1, 1)[0]
    stages, taps = BACKBONES["vgg"].run(layers, x, True)
    convs = []
    handles = [layer[i].register_forward_hook(lambda m, inp, out: convs.append(out.clone()))
               for layer in layers[3:] for i in (0, 3, 6)]
    plain = stages_with_hooks(layers, x, handles)
    for ours, ref in zip(stages, plain[1:]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert len(taps) == 7
    for tap, ref in zip(taps, [*convs, plain[-1]]):
        torch.testing.assert_close(tap, ref, rtol=1e-5, atol=1e-6)
    assert taps[0].min() < 0   # before BN and ReLU


# ---- 2. parameter-free operations -----------------------------------------------------------
def test_weighted_gap_by_hand():
    feat = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-2.0, 0.0], [6.0, 8.0]]]], dtype=torch.float64)
    mask = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]], dtype=torch.float64)
    expected = torch.tensor([(1.0 + 1.5) / 1.5005, (-2.0 + 3.0) / 1.5005], dtype=torch.float64).view(1, 2, 1, 1)
    torch.testing.assert_close(weighted_gap(feat, mask), expected, rtol=1e-12, atol=0)
    assert weighted_gap(feat, torch.zeros_like(mask)).abs().max() == 0


def test_gram_matrix_by_hand():
    feat = torch.tensor([[[[3.0, 4.0]], [[0.0, 2.0]]]], dtype=torch.float64)   # channels (3,4) and (0,2)
    expected = torch.tensor([[25 / (25 + 1e-7), 8 / (10 + 1e-7)], [8 / (10 + 1e-7), 4 / (4 + 1e-7)]],
                            dtype=torch.float64)
    torch.testing.assert_close(gram_matrix(feat), expected[None], rtol=1e-14, atol=0)


def test_gram_distance_normalised_by_channels():
    c = 6
    query = torch.zeros(2, c, c, dtype=torch.float64)
    query[1, 2, 3] = 1.0
    support = torch.ones(1, 2, c, c, dtype=torch.float64)      # one support set shared by two queries
    support[0, 1] = 0.0
    support[0, 1, 0, 0] = 2.0
    dist = gram_distance(query, support)
    assert dist.shape == (2, 2)
    expected = torch.tensor([[1.0, 2.0 / c], [math.sqrt(c * c - 1) / c, math.sqrt(5.0) / c]], dtype=torch.float64)
    torch.testing.assert_close(dist, expected, rtol=1e-12, atol=0)


def dense_prior(query_l4: Tensor, support_l4: Tensor, masks: Tensor, out_size: tuple[int, int]) -> Tensor:
    """PFENet prior, one (query, shot) at a time, comparing against every support position."""
    bq, bs, k = query_l4.shape[0], masks.shape[0], masks.shape[1]
    out = torch.zeros(bq, k, 1, *out_size, dtype=query_l4.dtype)
    for b in range(bq):
        for s in range(k):
            j = (b if bs == bq else 0) * k + s
            m = F.interpolate(masks[b if bs == bq else 0, s][None], support_l4.shape[-2:], mode="bilinear",
                              align_corners=True)[0]
            supp = (support_l4[j] * m).flatten(1)                  # [C, P], zero vectors off the mask
            query = query_l4[b].flatten(1)                         # [C, Q]
            cos = (supp.T @ query) / (supp.norm(dim=0)[:, None] * query.norm(dim=0)[None] + 1e-7)
            sim = cos.max(0).values
            sim = (sim - sim.min()) / (sim.max() - sim.min() + 1e-7)
            out[b, s, 0] = F.interpolate(sim.view(1, 1, *query_l4.shape[-2:]), out_size, mode="bilinear",
                                         align_corners=True)[0, 0]
    return out


def box_masks(shape: tuple[int, ...], seed: int, size: int = 13) -> Tensor:
    """Binary masks [..., 1, size, size] with a random box each, float64."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.zeros(math.prod(shape), 1, size, size, dtype=torch.float64)
    for m in flat:
        y, x = (int(v) for v in torch.randint(0, size - 6, (2,), generator=g))
        h, w = (int(v) for v in torch.randint(4, 7, (2,), generator=g))
        m[0, y:y + h, x:x + w] = 1.0
    return flat.view(*shape, 1, size, size)


def test_cosine_prior_matches_dense_reference():
    torch.manual_seed(0)
    query = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    support = torch.randn(4, 8, 5, 5, dtype=torch.float64)
    masks = box_masks((2, 2), seed=1)
    masks[1, 0] = 0.0                                              # an empty support mask
    prior = cosine_prior(query, support, masks, torch.Size((7, 7)))
    assert prior.shape == (2, 2, 1, 7, 7)
    torch.testing.assert_close(prior, dense_prior(query, support, masks, (7, 7)), rtol=1e-10, atol=1e-12)
    assert prior[1, 0].abs().max() == 0
    assert prior[0, 0].max() > 0.99 and prior[0, 0].min() < 0.01

    query_norm = query.flatten(2).norm(2, 1, True)                 # the cached-norm entry point
    torch.testing.assert_close(cosine_prior(query, support, masks, torch.Size((7, 7)), query_norm), prior,
                               rtol=1e-12, atol=1e-14)


def test_cosine_prior_full_mask_keeps_negative_maxima():
    """No zero position: the maximum cosine may be negative and must not be floored at 0."""
    torch.manual_seed(1)
    query = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    support = torch.rand(2, 4, 3, 3, dtype=torch.float64) + 0.5    # positive: opposite queries score < 0
    masks = torch.ones(2, 1, 1, 13, 13, dtype=torch.float64)
    raw = [((support[b].flatten(1).T @ query[b].flatten(1)) /
            (support[b].flatten(1).norm(dim=0)[:, None] * query[b].flatten(1).norm(dim=0)[None] + 1e-7)).max(0).values
           for b in range(2)]
    assert min(float(r.min()) for r in raw) < 0                    # the case this test is about
    torch.testing.assert_close(cosine_prior(query, support, masks, torch.Size((5, 5))),
                               dense_prior(query, support, masks, (5, 5)), rtol=1e-10, atol=1e-12)


def test_cosine_prior_one_support_set_shared_by_three_queries():
    torch.manual_seed(2)
    query = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    support = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    masks = box_masks((1, 2), seed=3)
    prior = cosine_prior(query, support, masks, torch.Size((9, 9)))
    assert prior.shape == (3, 2, 1, 9, 9)
    torch.testing.assert_close(prior, dense_prior(query, support, masks, (9, 9)), rtol=1e-10, atol=1e-12)
    for b in range(3):   # the same as each query alone with the shared supports
        torch.testing.assert_close(prior[b:b + 1], cosine_prior(query[b:b + 1], support, masks, torch.Size((9, 9))),
                                   rtol=1e-12, atol=1e-14)


def align(x: Tensor, size: int) -> Tensor:
    return F.interpolate(x, (size, size), mode="bilinear", align_corners=True)


def test_chained_masks_resize_from_the_previous_result():
    masks = torch.zeros(2, 1, 65, 65, dtype=torch.float64)
    masks[0, :, 10:41, 22:51] = 1.0
    masks[1, :, 30:, 5:19] = 1.0
    sizes = [torch.Size((17, 17)), torch.Size((9, 9)), torch.Size((9, 9)), torch.Size((5, 5))]
    chain = chained_masks(masks, sizes)
    first = align(masks, 34)
    m17 = align(first, 17)
    m9 = align(m17, 9)
    expected = [m17, m9, m9, align(m9, 5)]
    assert len(chain) == 4
    for ours, ref in zip(chain, expected):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-15)
    assert not torch.allclose(chain[0], align(masks, 17), atol=1e-3)   # chaining is not a direct resize
    # a single 9-wide map is reached through 18, not straight from the full mask
    torch.testing.assert_close(chained_masks(masks, [torch.Size((9, 9))])[0], align(align(masks, 18), 9),
                               rtol=0, atol=1e-15)


def dense_correlation(query_tap: Tensor, support_tap: Tensor, mask: Tensor, bs: int) -> Tensor:
    """Per (query, shot): masked, mean-selected support vectors; clamped cosine averaged over them."""
    bq, (h, w) = query_tap.shape[0], query_tap.shape[-2:]
    k = support_tap.shape[0] // bs
    out = torch.zeros(bq, k, 1, h, w, dtype=query_tap.dtype)
    for b in range(bq):
        q = query_tap[b].flatten(1)
        q = q / (q.norm(dim=0, keepdim=True) + 1e-5)
        for s in range(k):
            j = (b if bs == bq else 0) * k + s
            m = mask[j, 0].flatten()
            if not (m > 0).any():
                continue                                           # one zero vector: correlation 0
            keep = (m > 0) & (m >= m[m > 0].mean())
            vectors = support_tap[j].flatten(1)[:, keep] * m[keep]
            vectors = vectors / (vectors.norm(dim=0, keepdim=True) + 1e-5)
            out[b, s, 0] = (q.T @ vectors).clamp(min=0).mean(1).view(h, w)
    return out


def soft_masks(n: int, seed: int, size: int = 6) -> Tensor:
    return align(box_masks((n,), seed=seed, size=15), size)


def test_masked_correlation_matches_dense_reference():
    torch.manual_seed(5)
    query = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    support = torch.randn(4, 5, 6, 6, dtype=torch.float64)
    mask = soft_masks(4, seed=6)
    # Item 1 keeps fewer positions than item 0 and has positive, not kept values in its first
    # row: a batched implementation must not let them fill its shorter list.
    mask[0, 0, 1:, 1:] = 1.0
    mask[1] = 0.0
    mask[1, 0, 0] = 0.2
    mask[1, 0, 3:5, 2:4] = 1.0
    mask[3] = 0.0                                                  # empty mask
    assert ((mask > 0) & (mask < 1)).any()                         # soft values: the selection matters
    corr = masked_correlation(unit_vectors(query), support, mask, bs=2)
    assert corr.shape == (2, 2, 1, 6, 6)
    torch.testing.assert_close(corr, dense_correlation(query, support, mask, 2), rtol=1e-10, atol=1e-12)
    assert corr[1, 1].abs().max() == 0
    assert corr[0, 0].max() > 0


def test_masked_correlation_three_shots_shared_by_two_queries():
    torch.manual_seed(7)
    query = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    support = torch.randn(3, 5, 6, 6, dtype=torch.float64)
    mask = soft_masks(3, seed=8)
    corr = masked_correlation(unit_vectors(query), support, mask, bs=1)
    assert corr.shape == (2, 3, 1, 6, 6)
    torch.testing.assert_close(corr, dense_correlation(query, support, mask, 1), rtol=1e-10, atol=1e-12)


# ---- 3. k-shot weights ----------------------------------------------------------------------
class RankWeights(nn.Module):
    """Stands in for ``kshot_rw``: returns 0, 10, 20, ... by position and records its input."""

    def forward(self, x: Tensor) -> Tensor:
        self.seen = x.clone()
        return (torch.arange(x.shape[1], dtype=x.dtype) * 10).view(1, -1, 1, 1).expand(x.shape[0], -1, 1, 1)


@pytest.fixture(scope="module")
def five_shot_models():
    torch.manual_seed(0)
    small = dict(reduce_dim=16, base_width=16)
    return {"msanet_quirk": MSANet("mobilenetv2", 5, 15, kshot_order_quirk=True, **small).eval(),
            "msanet_fixed": MSANet("mobilenetv2", 5, 15, kshot_order_quirk=False, **small).eval(),
            "bam": BAM("mobilenetv2", 5, 15, **small).eval()}


@pytest.mark.parametrize("name, row0, row1", [
    ("msanet_quirk", (0, 10, 20, 30, 40), (0, 10, 20, 30, 40)),
    ("msanet_fixed", (20, 0, 40, 10, 30), (10, 20, 30, 40, 0)),
    ("bam", (20, 0, 40, 10, 30), (10, 20, 30, 40, 0)),
])
def test_shot_weights_order(five_shot_models, name, row0, row1):
    model = copy.deepcopy(five_shot_models[name])
    model.kshot_rw = RankWeights()
    est = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7], [0.2, 0.4, 0.6, 0.8, 0.1]])
    weights = model.shot_weights(est)
    torch.testing.assert_close(model.kshot_rw.seen.flatten(1), est.sort(1).values)   # fed in sorted order
    logits = torch.tensor([row0, row1], dtype=torch.float32)
    expected = logits.exp() / logits.exp().sum(1, keepdim=True)
    torch.testing.assert_close(weights, expected)


def test_shot_weights_one_shot_and_wrong_count(five_shot_models):
    model = five_shot_models["bam"]
    assert torch.equal(model.shot_weights(torch.tensor([[0.3], [0.7]])), torch.ones(2, 1))
    with pytest.raises(ValueError, match="5 shots"):
        model.shot_weights(torch.rand(1, 3))


# ---- 4. ensemble ----------------------------------------------------------------------------
def test_ensemble_by_hand(five_shot_models):
    model = copy.deepcopy(five_shot_models["bam"])
    with torch.no_grad():
        model.gram_merge.weight.copy_(torch.tensor([0.7, -0.4]).view(1, 2, 1, 1))
        model.cls_merge.weight.copy_(torch.tensor([0.9, 0.25]).view(1, 2, 1, 1))
    meta = torch.tensor([[[[0.0, 1.0], [2.0, -1.0]], [[1.0, 1.0], [0.0, 3.0]]]])
    base = torch.tensor([[[[0.0, 0.0], [1.0, 2.0]], [[1.0, 0.0], [0.0, 0.0]], [[0.0, 2.0], [0.0, -1.0]]]])
    est = torch.tensor([0.3]).view(1, 1, 1, 1)
    final = model.ensemble(meta, base, est)
    excluded = model.ensemble(meta, base, est, exclude=torch.tensor([2]))   # meta-training: own class out
    assert final.shape == (1, 2, 2, 2)
    for y in range(2):
        for x in range(2):
            e0, e1 = math.exp(meta[0, 0, y, x]), math.exp(meta[0, 1, y, x])
            bg, fg = e0 / (e0 + e1), e1 / (e0 + e1)
            b = [math.exp(v) for v in base[0, :, y, x]]
            base_map = (b[1] + b[2]) / sum(b)
            bg2, fg2 = 0.7 * bg - 0.4 * 0.3, 0.7 * fg - 0.4 * 0.3
            assert final[0, 0, y, x].item() == pytest.approx(0.9 * bg2 + 0.25 * base_map, abs=1e-6)
            assert final[0, 1, y, x].item() == pytest.approx(fg2, abs=1e-6)
            assert excluded[0, 0, y, x].item() == pytest.approx(0.9 * bg2 + 0.25 * b[1] / sum(b), abs=1e-6)


# ---- 5. output shapes and batching ----------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("backbone", ["resnet50", "resnet101", "vgg"])
@pytest.mark.parametrize("arch", ["MSANet", "BAM"])
def test_outputs_shapes_and_batch_equals_items(models, arch, backbone):
    model = models(arch, backbone)
    query, supports, masks = make_episode(10, batch=2, shot=2)
    pred = model(query, supports, masks)
    assert pred.final.shape == pred.meta.shape == (2, 2, SIZE, SIZE)
    assert pred.base.shape == (2, 16, SIZE, SIZE)
    for i in range(2):
        assert_same_prediction(model(query[i:i + 1], supports[i:i + 1], masks[i:i + 1]), item(pred, i))
    assert (pred.meta[0] - pred.meta[1]).abs().max() > 1e-3       # the items really differ

    one = model(query[:1], supports[:1, :1], masks[:1, :1])
    assert one.final.shape == one.meta.shape == (1, 2, SIZE, SIZE) and one.base.shape == (1, 16, SIZE, SIZE)
    assert (one.meta - pred.meta[:1]).abs().max() > 1e-3          # the second shot mattered


@torch.no_grad()
def test_one_support_set_shared_by_the_batch(models):
    """``match`` takes Bs = 1 supports for a batch of queries: each query as if alone."""
    model = models("MSANet", "vgg")
    query_img, supports, masks = make_episode(11, batch=2, shot=2)
    query, support = model.extract(query_img), model.extract(supports[0])
    embeddings = model.embed(support)[None].expand(2, -1, -1, -1, -1)   # guide wants them per query
    shared = model.decode(query, model.guide(model.match(query, support, masks[:1]), embeddings))
    for i in range(2):
        alone = model(query_img[i:i + 1], supports[:1], masks[:1])
        assert_same_prediction(alone, item(shared, i))


@torch.no_grad()
def test_coco_base_learner_has_61_channels():
    torch.manual_seed(0)
    model = BAM("mobilenetv2", 1, 60, reduce_dim=16, base_width=16).eval()
    query, supports, masks = make_episode(12, batch=1, shot=1, size=41)
    pred = model(query, supports, masks)
    assert pred.base.shape == (1, 61, 41, 41) and pred.final.shape == (1, 2, 41, 41)


# ---- 6. the steps: caching, ShotStats, Guidance, per-shot guidance ---------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("arch", ["MSANet", "BAM"])
def test_steps_on_cached_features_repeat_exactly(models, arch):
    model = models(arch, "resnet50")
    query_img, supports, masks = make_episode(13, batch=2, shot=2)
    query, support = model.extract(query_img), model.extract(supports.flatten(0, 1))
    first = run_steps(model, query, support, masks)
    assert {"gram", "base", "base_low"} <= set(query.cache) and "gram" in support.cache
    second = run_steps(model, query, support, masks)                # now from the caches
    for name in ("final", "meta", "base"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert_same_prediction(model(query_img, supports, masks), first, rtol=1e-6, atol=1e-7)
    # a batch slice of cached features (caches sliced along) gives that item's prediction
    assert_same_prediction(run_steps(model, query[1:2], support[2:4], masks[1:2]), item(first, 1))


@torch.no_grad()
def test_bam_takes_kept_masked_support_maps_for_their_masks_only(models):
    """Training hands BAM the masked support layer4 maps it computed earlier: they are used for
    the masks they belong to (batch slices included) and never for other masks."""
    model = models("BAM", "resnet50")
    _, supports, masks = make_episode(17, batch=1, shot=2)
    support = model.extract(supports.flatten(0, 1))
    full = (masks == 1).float().flatten(0, 1).unsqueeze(1)
    mask_l3, maps = model.masked_layer4(support, full)
    assert torch.equal(maps, model.layer4(support.layer3 * resize(full, support.layer3.shape[-2:])))
    marked = maps + 1.0
    BAM.keep_masked_layer4(support, mask_l3, marked)
    assert model.masked_layer4(support, full)[1] is marked
    assert torch.equal(model.masked_layer4(support[1:2], full[1:2])[1], marked[1:2])
    assert torch.equal(model.masked_layer4(support, full.flip(-1))[1],
                       model.layer4(support.layer3 * resize(full.flip(-1), support.layer3.shape[-2:])))


def stats_table(k: int, seed: int, with_corr: bool = True) -> ShotStats:
    g = torch.Generator().manual_seed(seed)
    return ShotStats(est=torch.rand(k, k, generator=g), prior=torch.rand(k, k, 1, 3, 3, generator=g),
                     mask_proto=torch.rand(k, k, 1, 3, 3, generator=g),
                     corr_l2=torch.rand(k, k, 4, 3, 3, generator=g) if with_corr else None)


def test_shot_stats_cat_and_shot():
    a, b = stats_table(2, 0), stats_table(2, 1)
    joined = ShotStats.cat([a, b])
    assert torch.equal(joined.est, torch.cat([a.est, b.est], 1)) and joined.est.shape == (2, 4)
    assert torch.equal(joined.corr_l2, torch.cat([a.corr_l2, b.corr_l2], 1))
    assert joined.mask_gam is None and joined.corr_l3 is None
    stacked = ShotStats.cat([a, b], dim=0)
    assert torch.equal(stacked.prior, torch.cat([a.prior, b.prior], 0))
    third = joined.shot(2)
    assert third.est.shape == (2, 1) and torch.equal(third.prior, b.prior[:, :1])
    assert torch.equal(third.corr_l2, b.corr_l2[:, :1])


def test_shot_stats_diagonal_and_replace():
    table, other = stats_table(3, 2), stats_table(3, 3)
    diag = table.diagonal()
    assert diag.est.shape == (3, 1) and diag.prior.shape == (3, 1, 1, 3, 3)
    for i in range(3):
        assert diag.est[i, 0] == table.est[i, i]
        assert torch.equal(diag.corr_l2[i, 0], table.corr_l2[i, i])
    column = other.shot(0)                                        # [3, 1] values
    replaced = table.replace_diagonal(column)
    for i in range(3):
        for j in range(3):
            source = column.prior[i, 0] if i == j else table.prior[i, j]
            assert torch.equal(replaced.prior[i, j], source)
            assert replaced.est[i, j] == (column.est[i, 0] if i == j else table.est[i, j])
    assert replaced.mask_gam is None
    assert torch.equal(table.replace_diagonal(diag).est, table.est)


def test_guidance_blend_mixes_all_but_est():
    g = torch.Generator().manual_seed(4)

    def guidance(full: bool) -> Guidance:
        extra = dict(hyper=torch.rand(1, 4, 3, 3, generator=g), gam=torch.rand(1, 5, 3, 3, generator=g)) if full else {}
        return Guidance(prototype=torch.rand(1, 5, 1, 1, generator=g), prior=torch.rand(1, 1, 3, 3, generator=g),
                        est=torch.rand(1, 1, 1, 1, generator=g), **extra)

    a, b = guidance(True), guidance(True)
    mixed = a.blend(b, (0.8, 0.2))
    for name in ("prototype", "prior", "hyper", "gam"):
        torch.testing.assert_close(getattr(mixed, name), 0.8 * getattr(a, name) + 0.2 * getattr(b, name))
    assert torch.equal(mixed.est, a.est)
    c, d = guidance(False), guidance(False)
    mixed = c.blend(d, (0.5, 0.5))
    assert mixed.hyper is None and mixed.gam is None and torch.equal(mixed.est, c.est)
    torch.testing.assert_close(mixed.prior, 0.5 * (c.prior + d.prior))


@torch.no_grad()
def test_guide_combines_shots_and_decode_resizes_low_resolution_outputs(models):
    model = models("MSANet", "vgg")
    query_img, supports, masks = make_episode(16, batch=1, shot=2)
    query, support = model.extract(query_img), model.extract(supports.flatten(0, 1))
    stats = model.match(query, support, masks)
    size = support.layer3.shape[-2:]
    fg = (masks[0] == 1).double()[:, None]
    torch.testing.assert_close(stats.mask_proto[0], align(fg, size[-1]).float())
    torch.testing.assert_close(stats.mask_gam[0], F.interpolate(fg, size, mode="nearest").float())

    embeddings = model.embed(support)                              # [K, C, h, w]
    guidance = model.guide(stats, embeddings[None])
    w = model.shot_weights(stats.est)[0]
    assert w.sum().item() == pytest.approx(1.0) and (w - 0.5).abs().max() > 1e-6
    prototypes = [(embeddings[k] * stats.mask_proto[0, k]).sum((1, 2)) / (stats.mask_proto[0, k].sum() + 5e-4)
                  for k in range(2)]
    torch.testing.assert_close(guidance.prototype[0, :, 0, 0], w[0] * prototypes[0] + w[1] * prototypes[1])
    torch.testing.assert_close(guidance.prior[0], w[0] * stats.prior[0, 0] + w[1] * stats.prior[0, 1])
    assert guidance.est.item() == pytest.approx(float((w * stats.est[0]).sum()), rel=1e-6)
    gated = [model.gam.gate((embeddings[k] * stats.mask_gam[0, k]).mean((1, 2)).view(1, -1, 1, 1))[0] * embeddings[k]
             for k in range(2)]
    torch.testing.assert_close(guidance.gam[0], (gated[0] + gated[1]) / 2)

    low: list[Tensor] = []
    handle = model.cls_meta.register_forward_hook(lambda m, inp, out: low.append(out))
    try:
        pred = model.decode(query, guidance)
    finally:
        handle.remove()
    base_low = model.learner_base(query.layer4)
    torch.testing.assert_close(pred.meta, align(low[0], SIZE))
    torch.testing.assert_close(pred.base, align(base_low, SIZE))
    torch.testing.assert_close(pred.final, align(model.ensemble(low[0], base_low, guidance.est), SIZE))


@torch.no_grad()
@pytest.mark.parametrize("arch", ["MSANet", "BAM"])
def test_prior_and_gram_inputs_per_arch(models, arch):
    """BAM runs layer4 on the masked support layer3 and (VGG) takes the Gram matrix of layer2
    resized to layer3's size; MSANet uses the plain support layer4 and layer2 as it is."""
    model = models(arch, "vgg")
    query_img, supports, masks = make_episode(17, batch=1, shot=2)
    query, support = model.extract(query_img), model.extract(supports.flatten(0, 1))
    stats = model.match(query, support, masks)
    fg = (masks == 1).double()[:, :, None]                         # [1, K, 1, S, S]
    support_l4 = support.layer4
    if arch == "BAM":
        support_l4 = model.layer4(support.layer3 * align(fg[0], support.layer3.shape[-1]).float())
    expected = dense_prior(query.layer4.double(), support_l4.double(), fg, tuple(query.layer3.shape[-2:]))
    torch.testing.assert_close(stats.prior.double(), expected, rtol=1e-4, atol=1e-5)

    def low(f) -> Tensor:
        return resize(f.layer2, f.layer3.shape[-2:]) if arch == "BAM" else f.layer2

    grams = gram_matrix(low(query).double()), gram_matrix(low(support).double())
    channels = grams[0].shape[-1]
    est = torch.stack([(grams[0][0] - grams[1][k]).norm() / channels for k in range(2)])
    torch.testing.assert_close(stats.est[0].double(), est, rtol=1e-4, atol=1e-7)


# ---- 7. the VGG l2 quirk ---------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("backbone", ["vgg", "resnet50"])
def test_l2_group_last_shot_quirk(models, backbone):
    model = models("MSANet", backbone)
    query_img, supports, masks = make_episode(14, batch=1, shot=2)
    query, support = model.extract(query_img), model.extract(supports.flatten(0, 1))
    stats = model.match(query, support, masks)
    embeddings = model.embed(support).reshape(1, 2, -1, *support.mid.shape[-2:])
    assert not torch.allclose(stats.corr_l2[:, 0], stats.corr_l2[:, 1], atol=1e-4)   # supports differ

    hyper_inputs: list[Tensor] = []
    handle = model.hyper_final.register_forward_pre_hook(lambda m, inp: hyper_inputs.append(inp[0].clone()))
    outputs = {}
    try:
        for quirk in (True, False):
            model.vgg_l2_last_shot_quirk = quirk
            outputs[quirk] = model.decode(query, model.guide(stats, embeddings))
    finally:
        handle.remove()
        model.vgg_l2_last_shot_quirk = True

    n2, n3, _ = model.levels
    size = stats.corr_l3.shape[-2:]
    last, mean = resize(stats.corr_l2[:, -1], size), resize(stats.corr_l2.mean(1), size)
    for quirk, seen in zip((True, False), hyper_inputs):
        expected_l2 = last if quirk and backbone == "vgg" else mean
        torch.testing.assert_close(seen[:, :n2], expected_l2)
        torch.testing.assert_close(seen[:, n2:n2 + n3], stats.corr_l3.mean(1))
        torch.testing.assert_close(seen[:, n2 + n3:], stats.corr_l4.mean(1))
    changed = (outputs[True].meta - outputs[False].meta).abs().max()
    assert changed > 1e-4 if backbone == "vgg" else changed == 0


@torch.no_grad()
@pytest.mark.parametrize("backbone", ["resnet50", "vgg", "mobilenetv2"])
def test_one_stage_is_that_of_the_full_extraction(models, backbone):
    """``stage`` (training's base-learner maps) runs the backbone only as far as it must, and
    gives exactly what the full extraction with taps gives."""
    model = models("MSANet", backbone)
    images = torch.randn(2, 3, 41, 41)
    feats = model.extract(images)
    for name in ("layer2", "layer3", "layer4"):
        assert torch.equal(model.stage(images, name), getattr(feats, name)), name


# ---- 8. frozen parts ------------------------------------------------------------------------
def test_train_mode_keeps_frozen_parts_in_eval(models):
    model = copy.deepcopy(models("MSANet", "resnet50")).train()
    frozen = ("layer0", "layer1", "layer2", "layer3", "layer4", "learner_base")
    assert all(not m.training for name in frozen for m in getattr(model, name).modules())
    assert all(m.training for module in model.adapted_modules() for m in module.modules())
    buffers = {k: v.clone() for k, v in model.state_dict().items() if k.split(".")[0] in frozen}
    hyper_mean = model.hyper_final[1].running_mean.clone()
    with torch.no_grad():
        model(*make_episode(15, batch=1, shot=2, size=41))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in buffers.items())
    assert not torch.equal(model.hyper_final[1].running_mean, hyper_mean)   # the forward ran in train mode


def test_adapted_modules(models):
    for model in (models("MSANet", "resnet50"), models("BAM", "vgg")):
        assert [id(m) for m in model.adapted_modules()] == [id(getattr(model, n)) for n in [*ADAPTED, "kshot_rw"]]
    for arch in ARCHS.values():
        one_shot = arch("mobilenetv2", 1, 15, reduce_dim=16, base_width=16)
        assert not hasattr(one_shot, "kshot_rw")
        assert [id(m) for m in one_shot.adapted_modules()] == [id(getattr(one_shot, n)) for n in ADAPTED]
