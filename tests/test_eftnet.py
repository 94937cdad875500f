"""EFTNet's round mechanics (model/eftnet.py) on small random-weight models.

The models are MSANet on the small MobileNetV2 backbone (reduce_dim 32) at 65 px, with the
meta classifier scaled and biased so that predictions mix foreground and background, and
one BAM-VGG16 for the second architecture. The selection rule is tested on ``best_round`` with
hand-made scores and on real runs; round scores are recomputed from the public model steps where
a test is about numbers. Everything goes through the public API and public torch hooks.
"""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

import model.eftnet as eftnet
from model import BAM, MSANet
from model.prototype import ADAPTED_MODULES, Guidance
from model.eftnet import (EFTNet, EFTNetSettings, confident_foreground, foreground_iou, pseudo_label,
                          round_learning_rate)
from model.round_selection import best_round

SIZE = 65
LR = 0.001
WEIGHTS = (0.8, 0.2)
SMALL = dict(reduce_dim=32, base_width=32)   # MobileNetV2 MSANet: fast on two CPU cores


def make_settings(**overrides) -> EFTNetSettings:
    values = dict(rounds=5, base_lr=LR, power=0.9, momentum=0.9, weight_decay=1e-4, aux_weight=1.0,
                  blend=WEIGHTS, q2s_fraction=0.2, query_mask_source="pseudo")
    values.update(overrides)
    return EFTNetSettings(**values)


# ---- episodes and models --------------------------------------------------------------------
def make_episode(seed: int, shot: int) -> SimpleNamespace:
    """Smooth noise images, each with a textured box (the object); the bottom rows and the
    right columns are padding (zero image, 255 in every mask)."""
    g = torch.Generator().manual_seed(seed)
    padding = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    padding[:, 57:], padding[:, :, 60:] = True, True

    def image() -> tuple[torch.Tensor, torch.Tensor]:
        img = F.avg_pool2d(torch.randn(1, 3, SIZE + 8, SIZE + 8, generator=g), 9, 1) * 3
        y0, x0 = (int(v) for v in torch.randint(0, 27, (2,), generator=g))
        img[:, :, y0:y0 + 30, x0:x0 + 30] = (torch.tensor([1.5, -1.0, 0.5]).view(1, 3, 1, 1)
                                             + 0.3 * torch.randn(1, 3, 30, 30, generator=g))
        mask = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
        mask[:, y0:y0 + 30, x0:x0 + 30] = 1
        return img.masked_fill(padding[:, None], 0.0), mask.masked_fill(padding, 255)

    query, query_mask = image()
    shots = [image() for _ in range(shot)]
    return SimpleNamespace(query=query, supports=torch.stack([s[0] for s in shots], 1),
                           masks=torch.stack([s[1] for s in shots], 1), padding=padding, query_mask=query_mask)


def build_msanet(shot: int, episode: SimpleNamespace, backbone: str = "mobilenetv2") -> MSANet:
    """Random MSANet whose plain prediction on ``episode`` is about 30 % foreground."""
    torch.manual_seed(shot)
    model = MSANet(backbone, shot, 15, **SMALL).eval()
    with torch.no_grad():
        model.gram_merge.weight.copy_(torch.tensor([1.0, 0.1]).view(1, 2, 1, 1))
        model.cls_merge.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
        # Random heads give nearly constant logits: spread them, then centre at the 70th percentile.
        model.cls_meta[3].weight.mul_(30.0)
        model.cls_meta[3].bias.zero_()
        meta = model(episode.query, episode.supports, episode.masks).meta
        model.cls_meta[3].bias.copy_(torch.tensor([0.0, -float((meta[:, 1] - meta[:, 0]).quantile(0.7))]))
    return model


def run(engine: EFTNet, episode: SimpleNamespace, **kwargs) -> eftnet.AdaptResult:
    kwargs.setdefault("padding", episode.padding)
    return engine.adapt(episode.query, episode.supports, episode.masks, **kwargs)


@pytest.fixture(scope="module")
def ep1() -> SimpleNamespace:
    return make_episode(3, 1)


@pytest.fixture(scope="module")
def ep1b() -> SimpleNamespace:
    return make_episode(7, 1)


@pytest.fixture(scope="module")
def ep2() -> SimpleNamespace:
    return make_episode(2, 2)


@pytest.fixture(scope="module")
def msanet1(ep1) -> MSANet:
    return build_msanet(1, ep1)


@pytest.fixture(scope="module")
def msanet2(ep2) -> MSANet:
    return build_msanet(2, ep2)


# ---- spies ----------------------------------------------------------------------------------
@pytest.fixture
def steps():
    """Every optimizer step taken during the test: the optimizer, its lrs and whether its
    state (momentum buffers) was still empty."""
    taken = []

    def hook(optimizer, args, kwargs):
        taken.append(SimpleNamespace(optimizer=optimizer, lrs=[g["lr"] for g in optimizer.param_groups],
                                     fresh=len(optimizer.state) == 0))

    handle = register_optimizer_step_pre_hook(hook)
    yield taken
    handle.remove()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, saved[k])]
    assert changed == []


def assert_same_result(a: eftnet.AdaptResult, b: eftnet.AdaptResult) -> None:
    assert a.round_scores == b.round_scores
    assert a.chosen_round == b.chosen_round
    assert a.losses == b.losses
    for name in ("final", "meta", "base", "pseudo_mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.zero_round.final, b.zero_round.final)


def is_adapted(key: str) -> bool:
    return key.split(".")[0] in ADAPTED_MODULES


# ---- direct computations from the public model steps ----------------------------------------
def blend(real: Guidance, same: Guidance) -> Guidance:
    """0.8 / 0.2 mix of every guidance field but est (which stays the real supports')."""
    def mix(a, b):
        return None if a is None else WEIGHTS[0] * a + WEIGHTS[1] * b
    return Guidance(prototype=mix(real.prototype, same.prototype), prior=mix(real.prior, same.prior),
                    est=real.est, hyper=mix(real.hyper, same.hyper), gam=mix(real.gam, same.gam))


def direct_q2s(model, episode: SimpleNamespace, previous: torch.Tensor):
    """A q2s round from scratch: fresh features, the real supports blended with the query under
    the top-20 % mask of ``previous``."""
    query = model.extract(episode.query)
    supports = model.extract(episode.supports[0])
    mask = confident_foreground(previous.softmax(1)[:, 1], 0.2)
    real = model.guide(model.match(query, supports, episode.masks), model.embed(supports)[None])
    query_as_support = model.extract(episode.query)
    same = model.guide(model.match(query, query_as_support, mask[:, None]), model.embed(query_as_support)[None])
    return model.decode(query, blend(real, same)), mask


@torch.no_grad()
def direct_s2q(model, episode: SimpleNamespace, query_mask: torch.Tensor) -> float:
    """Mean IoU of re-segmenting each support k with the query (under ``query_mask``) in slot k
    of the supports, blended with support k under its own mask; 255 counts as background."""
    shot = episode.supports.shape[1]
    ious = []
    for k in range(shot):
        target = model.extract(episode.supports[0, k:k + 1])
        images = torch.cat([episode.query if j == k else episode.supports[0, j:j + 1] for j in range(shot)])
        masks = torch.stack([query_mask[0] if j == k else episode.masks[0, j] for j in range(shot)])[None]
        others = model.extract(images)
        different = model.guide(model.match(target, others, masks), model.embed(others)[None])
        itself = model.extract(episode.supports[0, k:k + 1])
        same = model.guide(model.match(target, itself, episode.masks[:, k:k + 1]), model.embed(itself)[None])
        fg = model.decode(target, blend(different, same)).final.argmax(1) == 1
        label = episode.masks[:, k] == 1
        ious.append((fg & label).sum() / ((fg | label).sum() + eftnet.IOU_EPS))
    return float(torch.stack(ious).mean())


def padded_argmax(final: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    return final.argmax(1).masked_fill(padding, 255)


# ---- 0. the test models are usable ------------------------------------------------------------
def test_fixture_models_predict_a_mix_of_foreground_and_background(msanet1, msanet2, ep1, ep2):
    for model, episode in ((msanet1, ep1), (msanet2, ep2)):
        with torch.no_grad():
            fg = (model(episode.query, episode.supports, episode.masks).final.argmax(1) == 1).float().mean()
        assert 0.1 < float(fg) < 0.6


def test_config_is_validated(msanet1):
    with pytest.raises(ValueError, match="ft_number"):
        EFTNet(msanet1, make_settings(rounds=0))
    with pytest.raises(ValueError, match="s2q_query_mask"):
        EFTNet(msanet1, make_settings(query_mask_source="gt"))


# ---- 1. learning rates and steps --------------------------------------------------------------
def test_round_learning_rate_matches_reference_values():
    expected = [0.0050000001, 0.0042433308, 0.0034712659, 0.0026794338, 0.0018602054]
    for i, lr in enumerate(expected):
        assert round_learning_rate(0.005, 5, i, 0.9) == pytest.approx(lr, abs=1e-10)


def test_optimizer_uses_the_schedule_and_skips_the_last_step(msanet2, ep2, steps):
    cfg = make_settings(base_lr=0.005, momentum=0.8, weight_decay=2e-4)
    res = run(EFTNet(msanet2, cfg), ep2)
    # Five rounds, four steps: the fifth round's weights would never be scored.
    assert len(steps) == 4 and len(res.losses) == 4 and len(res.round_scores) == 5
    for i, step in enumerate(steps):
        assert step.lrs == [round_learning_rate(0.005, 5, i, 0.9)] * len(step.lrs)
    optimizer = steps[0].optimizer
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(step.optimizer is optimizer for step in steps)
    # One group per adapted module, in the reference order; kshot_rw is there for 2 shots.
    modules = msanet2.adapted_modules()
    assert modules[-1] is msanet2.kshot_rw
    assert len(optimizer.param_groups) == len(ADAPTED_MODULES) == len(modules)
    for group, module in zip(optimizer.param_groups, modules):
        assert [id(p) for p in group["params"]] == [id(p) for p in module.parameters()]
        settings = (group["momentum"], group["weight_decay"], group["dampening"], group["nesterov"])
        assert settings == (0.8, 2e-4, 0, False)


def test_single_round_takes_no_step(msanet1, ep1, steps):
    res = run(EFTNet(msanet1, make_settings(rounds=1)), ep1)
    assert steps == [] and res.losses == []
    assert len(res.round_scores) == 1 and res.chosen_round == 1


# ---- 2. which parameters change, and the restore ---------------------------------------------
def test_only_adapted_modules_change_and_everything_is_restored(ep2, steps):
    model = build_msanet(2, ep2)
    # A state the user might leave behind: training mode, a frozen adapted module, a trainable stage.
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    model.cls_merge.weight.requires_grad_(False)
    next(model.layer0.parameters()).requires_grad_(False)
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    before = snapshot(model)

    adapted, probed = {}, []

    def observer(probe):
        probed.append(probe.index)
        if probe.index == 5:   # the last round takes no step: its weights are the adapted ones
            adapted.update(snapshot(model))   # after the rounds, before the restore
    inside = []

    def check_step(optimizer, args, kwargs):
        inside.append(({name for name, p in model.named_parameters() if p.requires_grad},
                       any(m.training for m in model.modules())))
    handle = register_optimizer_step_pre_hook(check_step)
    try:
        run(EFTNet(model, make_settings(base_lr=0.005)), ep2, observer=observer)
    finally:
        handle.remove()

    assert len(steps) == 4 and probed == [1, 2, 3, 4, 5]
    # During the rounds: eval mode everywhere, gradients for the adapted parameters only.
    trainable = {name for name, _ in model.named_parameters() if is_adapted(name)}
    assert inside == [(trainable, False)] * 4
    frozen_keys = [k for k in before if not is_adapted(k)]
    assert {k.split(".")[0] for k in frozen_keys} == {"layer0", "layer1", "layer2", "layer3", "layer4",
                                                      "learner_base", "gam", "hyper_final"}
    assert "hyper_final.1.running_mean" in frozen_keys and "layer0.0.1.running_var" in frozen_keys
    assert [k for k in frozen_keys if not torch.equal(adapted[k], before[k])] == []
    adapted_keys = [k for k in before if is_adapted(k)]
    assert {k.split(".")[0] for k in adapted_keys} == set(ADAPTED_MODULES)
    assert [k for k in adapted_keys if torch.equal(adapted[k], before[k])] == []
    # After: every parameter and buffer, requires_grad flag and train/eval mode as before; no grads.
    assert_state_equal(model, before)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())


# ---- 3. pseudo masks ----------------------------------------------------------------------------
def map_with_foreground(scores: torch.Tensor) -> torch.Tensor:
    """[H,W] scores -> [1,2,H,W] map whose softmax fg probability is sigmoid(score)."""
    return torch.stack([torch.zeros_like(scores), scores])[None]


def test_confident_foreground_keeps_the_top_fifth_of_the_foreground():
    g = torch.Generator().manual_seed(0)
    scores = -torch.rand(400, generator=g) - 0.1          # background everywhere ...
    position = torch.randperm(400, generator=g)[:199]
    scores[position] = torch.linspace(0.1, 4.0, 199)      # ... but 199 distinct fg pixels
    mask = confident_foreground(map_with_foreground(scores.view(20, 20)).softmax(1)[:, 1], 0.2)
    assert mask.shape == (1, 20, 20) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    kept = mask.flatten().nonzero().flatten()
    assert sorted(kept.tolist()) == sorted(position[-39:].tolist())   # floor(0.2 * 199) = 39
    # Another fraction reads the same way: floor(0.5 * 199) = 99.
    assert int(confident_foreground(map_with_foreground(scores.view(20, 20)).softmax(1)[:, 1], 0.5).sum()) == 99


def test_confident_foreground_includes_ties_at_the_threshold():
    scores = torch.full((400,), -1.0)
    scores[:199] = torch.linspace(0.1, 4.0, 199)
    scores[157:160] = scores[160]     # the 39th largest value, now shared by three more pixels
    mask = confident_foreground(map_with_foreground(scores.view(20, 20)).softmax(1)[:, 1], 0.2).flatten()
    assert int(mask.sum()) == 42
    assert mask[157:199].all() and not mask[:157].any() and not mask[199:].any()


@pytest.mark.parametrize("n_fg", [0, 1, 4])
def test_confident_foreground_with_under_five_fg_pixels_keeps_the_whole_canvas(n_fg):
    scores = torch.full((400,), -2.0)
    scores[:n_fg] = 3.0
    assert torch.equal(confident_foreground(map_with_foreground(scores.view(20, 20)).softmax(1)[:, 1], 0.2),
                       torch.ones(1, 20, 20))


def test_confident_foreground_with_five_fg_pixels_keeps_one():
    scores = torch.full((400,), -2.0)
    scores[:5] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    mask = confident_foreground(map_with_foreground(scores.view(20, 20)).softmax(1)[:, 1], 0.2).flatten()
    assert mask.nonzero().flatten().tolist() == [4]


def test_confident_foreground_on_an_all_foreground_map():
    scores = torch.linspace(0.1, 4.0, 400)
    mask = confident_foreground(map_with_foreground(scores.view(20, 20)).softmax(1)[:, 1], 0.2).flatten()
    assert mask.nonzero().flatten().tolist() == list(range(320, 400))


def test_pseudo_label_is_the_argmax_with_padding_ignored():
    final = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    padding = torch.zeros(1, 6, 6, dtype=torch.bool)
    padding[:, 4:] = True
    label = pseudo_label(final, padding)
    argmax = (final[:, 1] > final[:, 0]).long()
    assert label.dtype == torch.int64
    assert torch.equal(label[:, :4], argmax[:, :4]) and (label[:, 4:] == 255).all()
    assert torch.equal(pseudo_label(final, None), argmax)


def test_foreground_iou_counts_255_as_background():
    final = map_with_foreground(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    mask = torch.tensor([[[1, 255], [0, 1]]])
    # fg prediction: 3 pixels; label fg: 2 pixels; intersection 1; union 4 (the 255 pixel included).
    assert float(foreground_iou(final, mask)[0]) == pytest.approx(0.25)


# ---- 4. selection rule -------------------------------------------------------------------------
@pytest.mark.parametrize("scores, chosen", [([0.3, 0.7, 0.7, 0.2, 0.5], 3),
                                            ([0.9, 0.1, 0.2, 0.3, 0.4], 1),
                                            ([0.0, 0.0, 0.0, 0.0, 0.0], 5),
                                            ([0.1, 0.2, 0.3, 0.4, 0.4], 5)])
def test_best_round_is_the_best_score_with_ties_to_the_later_round(scores, chosen):
    assert best_round(scores) == chosen


def empty_masks(episode: SimpleNamespace) -> SimpleNamespace:
    """The episode with no support foreground: every s2q score is 0."""
    return SimpleNamespace(**{**vars(episode), "masks": torch.zeros_like(episode.masks)})


@pytest.mark.parametrize("case", ["middle", "ties", "first"])
def test_the_engine_answers_with_the_best_round(msanet1, msanet2, ep1, ep2, case):
    """Real runs whose best rounds differ (their scores, on these fixtures: a strict best in the
    middle, all 0 so ties to the last round, a decline after round 1)."""
    model, episode, settings = {"middle": (msanet1, ep1, make_settings(base_lr=0.0002)),
                                "ties": (msanet1, empty_masks(ep1), make_settings()),
                                "first": (msanet2, ep2, make_settings(base_lr=0.005))}[case]
    res = run(EFTNet(model, settings), episode)
    predictions = res.rounds
    assert len(predictions) == 5 and [r.score for r in predictions] == res.round_scores
    chosen = res.chosen_round
    assert chosen == best_round(res.round_scores)
    best = predictions[chosen - 1]
    assert torch.equal(res.final, best.final) and torch.equal(res.meta, best.meta)
    # The rounds really differ, so the check above can tell them apart.
    others = [p for i, p in enumerate(predictions) if i != chosen - 1] + [res.zero_round]
    assert all(not torch.allclose(p.final, best.final) for p in others)


def test_round_one_is_accepted_with_score_zero(msanet1, ep1):
    assert best_round([0.0]) == 1
    res = run(EFTNet(msanet1, make_settings(rounds=1)), empty_masks(ep1))   # a real score of 0
    predictions = res.rounds
    assert res.chosen_round == 1 and res.round_scores == [0.0]
    assert torch.equal(res.final, predictions[0].final)
    assert not torch.allclose(res.final, res.zero_round.final)   # the zero round is never the answer


def test_round_selection_default_is_the_papers_rule_bit_for_bit(msanet2, ep2):
    default = run(EFTNet(msanet2, make_settings(base_lr=0.005)), ep2)
    explicit = run(EFTNet(msanet2, make_settings(base_lr=0.005, round_selection="s2q")), ep2)
    assert_same_result(default, explicit)
    assert default.selection == "s2q" and default.chosen_round == best_round(default.round_scores)
    assert torch.equal(default.final, default.rounds[default.chosen_round - 1].final)


@pytest.mark.parametrize("rule", ["s2q_stop", "soft_vote", "s2q_vote", "stop_vote"])
def test_every_round_selection_answers_with_its_rule_on_scores_and_predictions_only(msanet2, ep2, rule, monkeypatch):
    """Each rule receives the rounds' scores (and, to vote, their predictions): never a label.
    The rounds themselves are the same whatever the rule; only the answer differs."""
    from model import round_selection

    seen = []

    def spy(function):
        def wrapped(*args):
            seen.append(args)
            return function(*args)
        return wrapped

    monkeypatch.setitem(round_selection.ROUND_RULES, rule, spy(round_selection.ROUND_RULES[rule])) \
        if rule in round_selection.ROUND_RULES else \
        monkeypatch.setitem(round_selection.VOTE_RULES, rule, spy(round_selection.VOTE_RULES[rule]))
    paper = run(EFTNet(msanet2, make_settings(base_lr=0.005)), ep2)
    seen.clear()
    res = run(EFTNet(msanet2, make_settings(base_lr=0.005, round_selection=rule)), ep2)
    assert res.round_scores == paper.round_scores and res.selection == rule
    assert all(torch.equal(a.final, b.final) for a, b in zip(res.rounds, paper.rounds))
    finals, metas = [r.final for r in res.rounds], [r.meta for r in res.rounds]
    assert seen
    for args in seen:  # (scores,) for a round rule; (final or meta predictions, scores) for a vote rule
        if rule in round_selection.ROUND_RULES:
            assert args == (res.round_scores,)
        else:
            predictions, scores = args
            assert scores == res.round_scores
            assert any(all(torch.equal(a, b) for a, b in zip(predictions, group)) for group in (finals, metas))
    if rule == "s2q_stop":
        assert res.chosen_round == round_selection.first_peak(res.round_scores)
        assert torch.equal(res.final, res.rounds[res.chosen_round - 1].final)
    else:
        expected = {"soft_vote": round_selection.vote(finals),
                    "s2q_vote": round_selection.vote(finals, res.round_scores),
                    "stop_vote": round_selection.vote(finals[:round_selection.first_peak(res.round_scores)])}[rule]
        assert res.chosen_round is None
        assert torch.equal(res.final, expected)
        assert torch.equal(res.final, paper.votes[rule])  # every run records every vote
    probabilities = res.final.softmax(1)
    assert torch.allclose(probabilities.sum(1), torch.ones_like(probabilities[:, 0]))


def test_vote_is_the_mean_of_the_rounds_probabilities():
    from model.round_selection import vote

    a, b = torch.tensor([[[[0.0]], [[2.0]]]]), torch.tensor([[[[1.0]], [[-1.0]]]])
    pa, pb = a.softmax(1), b.softmax(1)
    assert torch.allclose(vote([a, b]).exp(), (pa + pb) / 2)
    assert torch.allclose(vote([a, b], [0.6, 0.2]).exp(), 0.75 * pa + 0.25 * pb)
    assert torch.allclose(vote([a, b], [0.0, 0.0]).exp(), (pa + pb) / 2)  # no weight: alike


def test_unknown_round_selection_is_refused():
    with pytest.raises(ValueError, match="round_selection must be one of"):
        make_settings(round_selection="oracle")


# ---- 5. reset between episodes ------------------------------------------------------------------
def test_episodes_do_not_leak_into_each_other(msanet1, ep1, ep1b, steps):
    engine = EFTNet(msanet1, make_settings(base_lr=0.005))
    a1 = run(engine, ep1)
    a2 = run(engine, ep1)                 # momentum or weights left over would change this
    b1 = run(engine, ep1b)
    a3 = run(engine, ep1)
    b2 = run(EFTNet(msanet1, make_settings(base_lr=0.005)), ep1b)
    assert_same_result(a1, a2)
    assert_same_result(a1, a3)
    assert_same_result(b1, b2)
    assert not torch.equal(a1.final, b1.final)
    # A new SGD optimizer, with empty momentum buffers, for each of the five episodes.
    firsts = steps[::4]
    assert len(steps) == 20 and all(s.fresh for s in firsts) and not any(s.fresh for i, s in enumerate(steps) if i % 4)
    assert len({id(s.optimizer) for s in firsts}) == 5


# ---- 6. cached rounds equal direct computations --------------------------------------------------
def test_zero_round_is_the_plain_forward(msanet2, ep2):
    res = run(EFTNet(msanet2, make_settings(rounds=1)), ep2)
    with torch.no_grad():
        plain = msanet2(ep2.query, ep2.supports, ep2.masks)
    for name in ("final", "meta", "base"):
        assert torch.allclose(getattr(res.zero_round, name), getattr(plain, name), atol=1e-6), name


@pytest.mark.parametrize("shot", [1, 2])
def test_first_two_rounds_equal_a_direct_computation(shot, msanet1, msanet2, ep1, ep2, monkeypatch):
    """Round 1 (weights as given) and round 2 (after one SGD step on round 1's loss against the
    zero round's padded argmax) rebuilt from fresh features, without the engine's caches."""
    model, episode = (msanet1, ep1) if shot == 1 else (msanet2, ep2)
    res = run(EFTNet(model, make_settings(rounds=2, base_lr=0.005, aux_weight=0.4)), episode)
    predictions = res.rounds

    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    groups = [list(m.parameters()) for m in ref.adapted_modules()]
    for p in (p for g in groups for p in g):
        p.requires_grad_(True)
    with torch.no_grad():
        zero = ref(episode.query, episode.supports, episode.masks)
        first_score = direct_s2q(ref, episode, padded_argmax(zero.final, episode.padding))
    first, mask = direct_q2s(ref, episode, zero.final)
    label = padded_argmax(zero.final, episode.padding)
    loss = (F.cross_entropy(first.final, label, ignore_index=255)
            + 0.4 * F.cross_entropy(first.meta, label, ignore_index=255))
    optimizer = torch.optim.SGD([{"params": g} for g in groups], lr=round_learning_rate(0.005, 2, 0, 0.9),
                                momentum=0.9, weight_decay=1e-4)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        second, _ = direct_q2s(ref, episode, first.final)
        second_score = direct_s2q(ref, episode, padded_argmax(first.final, episode.padding))

    assert torch.equal(res.pseudo_mask, mask) and torch.equal(predictions[0].q2s_mask, mask)
    assert torch.allclose(predictions[0].final, first.final, atol=1e-6)
    assert torch.allclose(predictions[0].meta, first.meta, atol=1e-5)
    assert res.losses == [pytest.approx(loss.item(), rel=1e-5)]
    assert torch.allclose(predictions[1].final, second.final, atol=1e-5)
    assert torch.allclose(predictions[1].meta, second.meta, atol=1e-4)
    assert res.round_scores == [pytest.approx(first_score, abs=1e-6), pytest.approx(second_score, abs=1e-6)]
    assert not torch.allclose(first.final, second.final, atol=1e-4)   # the step changed something


@pytest.mark.parametrize("shot", [1, 2])
@pytest.mark.parametrize("mode", ["pseudo", "ground_truth"])
def test_kept_similarity_products_change_no_output(shot, mode, msanet1, msanet2, ep1, ep2):
    """Rounds with every similarity product kept, with a budget that fills up after a few
    columns, and with none kept (the direct path) give the same rounds."""
    model, episode = (msanet1, ep1) if shot == 1 else (msanet2, ep2)
    results = [run(EFTNet(model, make_settings(query_mask_source=mode, similarity_cache_mb=mb)), episode,
                   query_mask=episode.query_mask) for mb in (0, 0.05, 1024)]
    direct = results[0]
    assert len({r.chosen_round for r in results}) == 1
    for res in results[1:]:
        assert res.round_scores == pytest.approx(direct.round_scores, abs=1e-6)
        assert res.losses == pytest.approx(direct.losses, rel=1e-5)
        for a, b in zip(res.rounds, direct.rounds):
            assert torch.equal(a.q2s_mask, b.q2s_mask)
            assert torch.allclose(a.final, b.final, atol=1e-5) and torch.allclose(a.meta, b.meta, atol=1e-5)
        assert torch.allclose(res.final, direct.final, atol=1e-5)


def test_kept_similarity_products_change_no_output_with_vgg_taps(ep1):
    """VGG's correlated taps come at two sizes (layer3 and layer4 at 65 px: 9 and 5)."""
    model = build_msanet(1, ep1, "vgg")
    direct, kept = (run(EFTNet(model, make_settings(similarity_cache_mb=mb)), ep1) for mb in (0, 1024))
    assert kept.chosen_round == direct.chosen_round
    assert kept.round_scores == pytest.approx(direct.round_scores, abs=1e-6)
    assert torch.allclose(kept.final, direct.final, atol=1e-5) and torch.allclose(kept.meta, direct.meta, atol=1e-5)


# ---- 7. the query label is read only when asked for ------------------------------------------------
def test_pseudo_mode_ignores_the_query_mask(msanet1, ep1):
    engine = EFTNet(msanet1, make_settings())
    plain = run(engine, ep1)
    opposite = (1 - plain.zero_round.final.argmax(1)).masked_fill(ep1.padding, 255)
    assert_same_result(plain, run(engine, ep1, query_mask=opposite))
    assert_same_result(plain, run(engine, ep1, query_mask=ep1.query_mask))


def test_ground_truth_mode_scores_with_the_query_mask(msanet1, ep1):
    pseudo = run(EFTNet(msanet1, make_settings()), ep1)
    engine = EFTNet(msanet1, make_settings(query_mask_source="ground_truth"))
    zero_label = padded_argmax(pseudo.zero_round.final, ep1.padding)
    opposite = (1 - zero_label).masked_fill(ep1.padding, 255)
    same_as_pseudo = run(engine, ep1, query_mask=zero_label)
    flipped = run(engine, ep1, query_mask=opposite)
    # Round 1's pseudo query mask is the zero round's padded argmax, so that score agrees.
    assert same_as_pseudo.round_scores[0] == pseudo.round_scores[0]
    assert flipped.round_scores[0] != same_as_pseudo.round_scores[0]
    # The q2s predictions do not read the query label at all.
    assert torch.equal(flipped.pseudo_mask, same_as_pseudo.pseudo_mask)
    with pytest.raises(ValueError, match="query_mask"):
        run(engine, ep1)


def test_observer_gets_the_reference_scores_without_changing_the_rounds(msanet1, ep1):
    """The evaluator's probe scores each round with the query label; the rounds themselves are
    those of a run without observer, and the probe's scores those of a ground_truth run."""
    plain = run(EFTNet(msanet1, make_settings()), ep1)
    probed = []
    observed = run(EFTNet(msanet1, make_settings()), ep1,
                   observer=lambda probe: probed.append((probe.index, probe.s2q_score(ep1.query_mask))))
    reference = run(EFTNet(msanet1, make_settings(query_mask_source="ground_truth")), ep1, query_mask=ep1.query_mask)
    assert_same_result(plain, observed)
    assert [i for i, _ in probed] == [1, 2, 3, 4, 5]
    assert [v for _, v in probed] == pytest.approx(reference.round_scores, abs=1e-6)
    assert [v for _, v in probed] != pytest.approx(plain.round_scores, abs=1e-6)


def test_q2s_ablation_uses_the_real_supports_only(msanet1, ep1):
    blended = run(EFTNet(msanet1, make_settings()), ep1)
    alone = run(EFTNet(msanet1, make_settings(q2s_blend=False)), ep1)
    # Round 1 has the given weights: without the query blended in, its prediction is the zero round.
    assert torch.allclose(alone.rounds[0].final, alone.zero_round.final, atol=1e-6)
    assert not torch.allclose(blended.rounds[0].final, blended.zero_round.final, atol=1e-4)
    # The s2q scoring is the same step in both: round 1's score agrees.
    assert alone.round_scores[0] == pytest.approx(blended.round_scores[0], abs=1e-7)


# ---- 8. a non-finite loss ends the rounds ---------------------------------------------------------
@pytest.mark.parametrize("nan_from_round", [1, 2, 4])
def test_non_finite_loss_stops_with_the_best_round_so_far(msanet1, ep1, steps, nan_from_round):
    """Round 1's loss is NaN with a NaN aux weight (its prediction stays finite); a later round's
    loss is NaN when the step before it writes NaN into a parameter. On these fixtures the
    rounds so far score like [0.21, 0.21, 0.23, 0] (0: NaN weights predict no foreground)."""
    aux_weight = float("nan") if nan_from_round == 1 else 1.0
    taken = []

    def poison(optimizer, args, kwargs):
        taken.append(1)
        if len(taken) == nan_from_round - 1:   # the step before round ``nan_from_round``
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("nan"))
    handle = register_optimizer_step_pre_hook(poison)
    before = snapshot(msanet1)
    try:
        res = run(EFTNet(msanet1, make_settings(base_lr=0.0002, aux_weight=aux_weight)), ep1)
    finally:
        handle.remove()
    predictions = res.rounds
    assert res.stopped_early
    assert len(res.round_scores) == len(predictions) == nan_from_round
    assert [r.score for r in predictions] == res.round_scores
    assert len(res.losses) == nan_from_round and math.isnan(res.losses[-1])
    assert all(math.isfinite(v) for v in res.losses[:-1])
    assert len(steps) == nan_from_round - 1
    assert res.chosen_round == best_round(res.round_scores) and 1 <= res.chosen_round <= nan_from_round
    assert torch.equal(res.final, predictions[res.chosen_round - 1].final)
    assert torch.isfinite(res.final).all() and torch.isfinite(res.meta).all()
    assert_state_equal(msanet1, before)


def test_finite_run_is_not_marked_stopped(msanet1, ep1):
    res = run(EFTNet(msanet1, make_settings()), ep1)
    assert not res.stopped_early and len(res.losses) == 4 and all(math.isfinite(v) for v in res.losses)


# ---- 9. edge cases ----------------------------------------------------------------------------------
def test_empty_and_all_ignored_support_masks(msanet1, ep1):
    engine = EFTNet(msanet1, make_settings())
    empty = SimpleNamespace(**{**vars(ep1), "masks": torch.zeros_like(ep1.masks)})
    ignored = SimpleNamespace(**{**vars(ep1), "masks": torch.full_like(ep1.masks, 255)})
    res_empty, res_ignored = run(engine, empty), run(engine, ignored)
    for res in (res_empty, res_ignored):
        assert all(math.isfinite(s) for s in res.round_scores) and all(math.isfinite(v) for v in res.losses)
        for t in (res.final, res.meta, res.base, res.zero_round.final):
            assert torch.isfinite(t).all()
        assert 1 <= res.chosen_round <= 5
    # No support foreground to re-segment: every IoU is 0. 255 reads as background everywhere.
    assert res_empty.round_scores == [0.0] * 5
    assert_same_result(res_empty, res_ignored)


def test_batches_of_more_than_one_episode_are_refused(msanet1, ep1):
    with pytest.raises(ValueError, match="batch"):
        EFTNet(msanet1, make_settings()).adapt(ep1.query.expand(2, -1, -1, -1), ep1.supports.expand(2, -1, -1, -1, -1),
                                          ep1.masks.expand(2, -1, -1, -1))


# ---- 10. BAM -----------------------------------------------------------------------------------------
def test_bam_goes_through_the_same_rounds(ep1, steps):
    torch.manual_seed(0)
    bam = BAM("vgg", 1, 15).eval()
    before = snapshot(bam)
    res = run(EFTNet(bam, make_settings()), ep1)
    assert len(res.round_scores) == 5 and 1 <= res.chosen_round <= 5 and len(steps) == 4
    assert res.final.shape == res.meta.shape == (1, 2, SIZE, SIZE)
    for t in (res.final, res.meta, res.base):
        assert torch.isfinite(t).all()
    with torch.no_grad():
        plain = bam(ep1.query, ep1.supports, ep1.masks)
    assert torch.allclose(res.zero_round.final, plain.final, atol=1e-6)
    assert_state_equal(bam, before)
