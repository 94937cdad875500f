import pytest
import torch
import torch.distributed as dist

from evaluation.metrics import (BaseClassMeter, FewShotMeter, episode_counts, intersection_union,
                                original_resolution)


def reference_counts(pred, target, k, ignore=255):
    """The reference's histc counting, rewritten for comparison."""
    pred = pred.reshape(-1).clone().float()
    target = target.reshape(-1).float()
    pred[target == ignore] = ignore
    inter = torch.histc(pred[pred == target], bins=k, min=0, max=k - 1)
    area_pred = torch.histc(pred, bins=k, min=0, max=k - 1)
    area_target = torch.histc(target, bins=k, min=0, max=k - 1)
    return inter, area_pred + area_target - inter, area_target


def test_intersection_union_hand_computed_with_ignore():
    pred = torch.tensor([[0, 1, 1], [0, 1, 1]])
    target = torch.tensor([[0, 1, 0], [255, 255, 1]], dtype=torch.uint8)
    inter, union, area_target = intersection_union(pred, target, 2)
    # The fg prediction on the ignored pixel (row 1, col 1) must not count anywhere.
    assert inter.tolist() == [1, 2]
    assert union.tolist() == [2, 3]
    assert area_target.tolist() == [2, 2]
    assert inter.dtype == union.dtype == area_target.dtype == torch.int64
    assert pred.tolist() == [[0, 1, 1], [0, 1, 1]]  # input not modified


def test_intersection_union_all_ignored_and_shape_error():
    inter, union, area_target = intersection_union(torch.ones(4, dtype=torch.long),
                                                   torch.full((4,), 255), 2)
    assert inter.tolist() == union.tolist() == area_target.tolist() == [0, 0]
    with pytest.raises(ValueError, match="shape"):
        intersection_union(torch.zeros(2, 3), torch.zeros(3, 2), 2)


@pytest.mark.parametrize("k", [2, 16, 61])
def test_intersection_union_equals_reference_histc(k):
    gen = torch.Generator().manual_seed(k)
    for _ in range(5):
        pred = torch.randint(0, k, (37, 41), generator=gen)
        target = torch.randint(0, k, (37, 41), generator=gen)
        target[torch.rand(37, 41, generator=gen) < 0.2] = 255
        ours = intersection_union(pred, target, k)
        for got, expected in zip(ours, reference_counts(pred, target, k)):
            assert torch.equal(got, expected.long())


def test_original_resolution_pastes_wide_label_into_square_canvas():
    label = torch.tensor([[0, 1, 1, 0, 255],
                          [1, 1, 0, 0, 0],
                          [0, 0, 0, 1, 1]], dtype=torch.uint8)
    logits = torch.zeros(1, 2, 7, 7)
    logits[:, 1] = 1.0  # constant map: fg everywhere after upsampling
    pred, target = original_resolution(logits, label)
    assert pred.shape == target.shape == (5, 5)
    assert pred.dtype == target.dtype == torch.int64
    assert torch.equal(pred, torch.ones(5, 5, dtype=torch.long))
    assert torch.equal(target[:3], label.long())
    assert (target[3:] == 255).all()

    _, tall_target = original_resolution(logits, label.t())
    assert tall_target.shape == (5, 5)
    assert (tall_target[:, 3:] == 255).all()
    assert torch.equal(tall_target[:, :3], label.t().long())


def test_original_resolution_uses_align_corners_true():
    # fg logit ramps 0 -> 1 across a 2x2 map; align_corners=True samples 0, .25, .5, .75, 1
    # on a 5-wide canvas (align_corners=False would give 0, .1, .5, .9, 1).
    logits = torch.tensor([[0.2, 0.2], [0.2, 0.2]]).expand(1, 1, 2, 2)
    ramp = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).expand(1, 1, 2, 2)
    pred, _ = original_resolution(torch.cat([logits, ramp], 1), torch.zeros(5, 5))
    assert pred[0].tolist() == [0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match=r"\[1, C, S, S\]"):
        original_resolution(torch.zeros(2, 2, 4, 4), torch.zeros(3, 3))


def test_episode_counts_on_original_canvas():
    logits = torch.zeros(1, 2, 4, 4)
    logits[:, 1] = 1.0
    label = torch.tensor([[0, 1, 1], [255, 1, 0]])
    inter, union, area_target = episode_counts(logits, label, 2)
    # canvas 3x3: row 2 and the 255 pixel ignored; pred fg elsewhere (5 valid pixels)
    assert inter.tolist() == [0, 3]
    assert union.tolist() == [2, 5]
    assert area_target.tolist() == [2, 3]


def test_class_miou_counts_undrawn_class_as_zero():
    meter = FewShotMeter(3)
    meter.add(0, torch.tensor([5, 3]), torch.tensor([6, 4]), torch.tensor([5, 4]))
    meter.add(0, torch.tensor([5, 1]), torch.tensor([6, 4]), torch.tensor([5, 4]))
    meter.add(2, torch.tensor([9, 1]), torch.tensor([10, 2]), torch.tensor([9, 2]))
    assert meter.class_iou().tolist() == pytest.approx([4 / 8, 0.0, 1 / 2])
    assert meter.class_miou() == pytest.approx((0.5 + 0.0 + 0.5) / 3)
    assert meter.episodes_per_class.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="class_idx"):
        meter.add(3, torch.tensor([1, 1]), torch.tensor([1, 1]), torch.tensor([1, 1]))


def test_fb_iou_is_dataset_level_not_episode_mean():
    meter = FewShotMeter(1)
    episodes = [([90, 0], [100, 10]), ([1, 1], [2, 1])]
    for inter, union in episodes:
        meter.add(0, torch.tensor(inter), torch.tensor(union), torch.tensor(union))
    pooled_bg, pooled_fg = 91 / 102, 1 / 11
    assert meter.fb_iou() == pytest.approx((pooled_bg + pooled_fg) / 2)
    assert meter.fg_iou() == pytest.approx(pooled_fg)
    per_episode = ((0.9 + 0.0) / 2 + (0.5 + 1.0) / 2) / 2
    assert abs(meter.fb_iou() - per_episode) > 0.05


def test_base_miou_drops_classes_without_target_from_denominator():
    meter = BaseClassMeter(3)
    # channel 0 (background) is skipped; class 2 is predicted but never present.
    meter.add(torch.tensor([50, 2, 0, 3]), torch.tensor([90, 4, 5, 3]),
              torch.tensor([70, 3, 0, 3]))
    iou = meter.class_iou()
    assert iou[0].item() == pytest.approx(0.5)
    assert iou[1].isnan() and iou[2].item() == pytest.approx(1.0)
    assert meter.miou() == pytest.approx((0.5 + 0.0 + 1.0) / (3 - 1))
    assert BaseClassMeter(2).miou() != BaseClassMeter(2).miou()  # NaN when nothing present
    with pytest.raises(ValueError, match="background first"):
        meter.add(torch.zeros(3), torch.zeros(3), torch.zeros(3))


def _random_episodes(n, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        pred = torch.randint(0, 2, (9, 11), generator=gen)
        target = torch.randint(0, 2, (9, 11), generator=gen)
        target[0, :4] = 255
        cls = int(torch.randint(0, 4, (1,), generator=gen))
        out.append((cls, *intersection_union(pred, target, 2)))
    return out


def test_all_reduce_single_rank(tmp_path):
    meter = FewShotMeter(2)
    meter.add(1, torch.tensor([3, 4]), torch.tensor([5, 6]), torch.tensor([4, 5]))
    before = meter.class_iou().clone(), meter.fb_iou()
    meter.all_reduce()  # no process group: no-op
    assert torch.equal(meter.class_iou(), before[0]) and meter.fb_iou() == before[1]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        meter.all_reduce()
    finally:
        dist.destroy_process_group()
    assert torch.equal(meter.class_iou(), before[0]) and meter.fb_iou() == before[1]
