"""A toy few-shot segmenter written only against docs/plugging_in.md, run through EFTNet.adapt.

The toy: a frozen 1x1-conv + BatchNorm "backbone"; as the statistic, the cosine of every query
pixel with each support's masked-average foreground prototype (a ShotTable); no support
embedding; the shots' mean cosine as the guidance (a Blendable); a 1x1-conv head, the part
EFTNet adapts. Its rule as built: foreground where the mean cosine exceeds 0.5.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.base import Blendable, FewShotModel, Prediction, ShotTable
from model.eftnet import AdaptResult, EFTNet, EFTNetSettings, RoundProbe

SIZE = 17
CHANNELS = 4
THRESHOLD = 0.5   # the toy rule: foreground where the mean cosine exceeds it
SCALE = 4.0       # logit gap per unit of cosine
ROUNDS = 3
RED, GREEN = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)


# ---- the toy model --------------------------------------------------------------------------
@dataclass
class Features:
    """Frozen feature maps [N, C, S, S] of N images."""

    maps: Tensor

    @property
    def batch(self) -> int:
        return self.maps.shape[0]

    def __getitem__(self, index: slice) -> "Features":
        return Features(self.maps[index])


@dataclass
class Similarity(ShotTable):
    """Cosine of each query pixel with each shot's foreground prototype, [B, K, 1, S, S]."""

    cosine: Tensor


@dataclass
class Guidance(Blendable):
    """The shots' mean cosine, [B, 1, S, S]."""

    cosine: Tensor


class ToyModel(FewShotModel):
    """Cosine-to-prototype segmenter; ``head`` is adapted, ``backbone`` frozen."""

    def __init__(self, shot: int = 1):
        super().__init__()
        self.shot = shot
        self.backbone = nn.Sequential(nn.Conv2d(3, CHANNELS, 1, bias=False), nn.BatchNorm2d(CHANNELS))
        self.head = nn.Conv2d(1, 2, 1)
        with torch.no_grad():  # logits [SCALE * (THRESHOLD - c), SCALE * (c - THRESHOLD)]
            self.head.weight.copy_(torch.tensor([-SCALE, SCALE]).view(2, 1, 1, 1))
            self.head.bias.copy_(torch.tensor([SCALE * THRESHOLD, -SCALE * THRESHOLD]))

    @torch.no_grad()
    def extract(self, images: Tensor) -> Features:
        return Features(self.backbone(images))

    @torch.no_grad()
    def match(self, query: Features, support: Features, masks: Tensor) -> Similarity:
        bs, k = masks.shape[:2]
        fg = (masks == 1).float().flatten(0, 1).unsqueeze(1)                          # [Bs*K, 1, S, S]
        prototypes = (support.maps * fg).sum((2, 3)) / (fg.sum((2, 3)) + 1e-5)       # [Bs*K, C]
        prototypes = F.normalize(prototypes, dim=1).view(bs, k, -1).expand(query.batch, -1, -1)
        cosine = torch.einsum("bchw,bkc->bkhw", F.normalize(query.maps, dim=1), prototypes)
        return Similarity(cosine=cosine.unsqueeze(2))

    def embed(self, images: Features) -> Tensor:
        return images.maps.new_zeros(images.batch, 0)

    def guide(self, stats: Similarity, embeddings: Tensor) -> Guidance:
        return Guidance(cosine=stats.cosine.mean(1))

    def decode(self, query: Features, guidance: Guidance) -> Prediction:
        logits = self.head(guidance.cosine)
        return Prediction(final=logits, meta=logits)

    def adapted_modules(self) -> list[nn.Module]:
        return [self.head]

    def frozen_modules(self) -> list[nn.Module]:
        return [self.backbone]


# ---- episodes -------------------------------------------------------------------------------
def painted(background: tuple[float, ...], colour: tuple[float, ...], box: tuple[int, int, int, int]) -> Tensor:
    """A [3, S, S] image of ``background`` with ``colour`` on rows y0:y1, columns x0:x1."""
    image = torch.tensor(background).view(3, 1, 1).repeat(1, SIZE, SIZE)
    y0, y1, x0, x1 = box
    image[:, y0:y1, x0:x1] = torch.tensor(colour).view(3, 1)[..., None]
    return image


def box_mask(box: tuple[int, int, int, int]) -> Tensor:
    mask = torch.zeros(SIZE, SIZE, dtype=torch.long)
    y0, y1, x0, x1 = box
    mask[y0:y1, x0:x1] = 1
    return mask


def random_episode(seed: int, shots: int) -> tuple[Tensor, Tensor, Tensor]:
    """One query and ``shots`` supports: noise with a noisy reddish box; masks mark the box."""
    g = torch.Generator().manual_seed(seed)

    def image() -> tuple[Tensor, Tensor]:
        y0, x0 = (int(v) for v in torch.randint(0, 8, (2,), generator=g))
        box = (y0, y0 + 9, x0, x0 + 9)
        img = torch.randn(3, SIZE, SIZE, generator=g)
        img[:, box[0]:box[1], box[2]:box[3]] = (torch.tensor([2.0, -1.0, 0.5]).view(3, 1, 1)
                                                + 0.8 * torch.randn(3, 9, 9, generator=g))
        return img, box_mask(box)

    query, _ = image()
    supports = [image() for _ in range(shots)]
    return (query[None], torch.stack([s[0] for s in supports])[None],
            torch.stack([s[1] for s in supports])[None])


def random_model(shot: int) -> ToyModel:
    """A toy with seeded random backbone weights and BatchNorm statistics far from 0 and 1."""
    torch.manual_seed(0)
    model = ToyModel(shot)
    norm = model.backbone[1]
    with torch.no_grad():
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    return model


def state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_equal(module: nn.Module, saved: dict[str, Tensor]) -> None:
    assert [k for k, v in module.state_dict().items() if not torch.equal(v, saved[k])] == []


# ---- tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shots", [1, 2])
def test_forward_follows_the_toy_rule(shots: int) -> None:
    """With an identity backbone a red pixel's cosine to a red prototype is 1 and a green one's 0,
    so the answer is the red part of each query, whatever the supports' layout (B = 2, Bs = B)."""
    model = ToyModel(shot=2).eval()
    with torch.no_grad():
        model.backbone[0].weight.copy_(torch.eye(CHANNELS, 3).view(CHANNELS, 3, 1, 1))
    left, right = (0, SIZE, 0, 8), (0, SIZE, 8, SIZE)
    queries = torch.stack([painted(GREEN, RED, left), painted(GREEN, RED, right)])
    boxes = [(2, 9, 3, 12), (8, 15, 1, 6)][:shots]
    supports = torch.stack([painted(GREEN, RED, b) for b in boxes])[None].repeat(2, 1, 1, 1, 1)
    masks = torch.stack([box_mask(b) for b in boxes])[None].repeat(2, 1, 1, 1)
    prediction = model(queries, supports, masks)
    assert isinstance(prediction, Prediction)
    assert prediction.final.shape == prediction.meta.shape == (2, 2, SIZE, SIZE)
    assert prediction.base is None
    assert torch.equal(prediction.final.argmax(1), torch.stack([box_mask(left), box_mask(right)]))


@pytest.mark.parametrize("shots", [1, 2])
def test_adapt_steps_and_restores(shots: int) -> None:
    """Three rounds: scores in [0, 1], a chosen round, two steps that change the head between
    rounds, the head restored bit for bit after, the backbone never changed nor in train mode."""
    model = random_model(shot=2).train()
    query, supports, masks = random_episode(seed=shots, shots=shots)
    head, backbone = state(model.head), state(model.backbone)
    plain = model(query, supports, masks)
    seen: list[tuple[list[Tensor], bool]] = []

    def observer(probe: RoundProbe) -> None:
        seen.append(([p.detach().clone() for p in model.head.parameters()], model.training))

    settings = EFTNetSettings(rounds=ROUNDS, base_lr=0.1)
    result = EFTNet(model, settings).adapt(query, supports, masks, observer=observer)

    assert isinstance(result, AdaptResult)
    assert len(result.round_scores) == ROUNDS
    assert all(0.0 <= s <= 1.0 for s in result.round_scores)
    assert result.chosen_round in range(1, ROUNDS + 1)
    assert result.round_scores[result.chosen_round - 1] == max(result.round_scores)
    assert torch.equal(result.final, result.rounds[result.chosen_round - 1].final)
    torch.testing.assert_close(result.zero_round.final, plain.final)
    # the steps: one loss per round but the last, each changing the head's weights
    assert len(result.losses) == ROUNDS - 1 and all(loss > 0 for loss in result.losses)
    weights = [w for w, _ in seen]
    assert all(torch.equal(a, b) for a, b in zip(weights[0], head.values()))
    for before, after in zip(weights, weights[1:]):
        assert not all(torch.equal(a, b) for a, b in zip(before, after))
    assert not torch.equal(result.rounds[0].meta, result.rounds[1].meta)
    # eval mode during the rounds; afterwards the mode, the head and the backbone as they were
    assert [training for _, training in seen] == [False] * ROUNDS
    assert model.training and model.head.training and not model.backbone.training
    assert_state_equal(model.head, head)
    assert_state_equal(model.backbone, backbone)
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_modules_stay_in_eval_mode() -> None:
    """``train()`` leaves the frozen backbone in eval mode, so a forward in training mode keeps
    its BatchNorm statistics and uses them."""
    model = random_model(shot=1).train()
    query, supports, masks = random_episode(seed=3, shots=1)
    backbone = state(model.backbone)
    trained = model(query, supports, masks)
    assert model.head.training and not model.backbone.training
    assert_state_equal(model.backbone, backbone)
    torch.testing.assert_close(trained.final, model.eval()(query, supports, masks).final)
