"""Train a few-shot base model (MSANet or BAM) on a fold's base classes, in two stages.

    python train.py --config config/demo/demo_split0_mobilenetv2.yaml [--opts key value ...]

1. Base learner: ``learner_base`` (PPM + classifier, as PSPNet's) learns to segment the base
   classes of the train list (background 0, base classes 1..n, 255 ignored); with
   ``base_learner_layer4_lr`` > 0 the backbone's last stage (layer4) learns with it, as a
   PSPNet's backbone does, and is then frozen like the rest for stage 2 and meta-testing.
2. Meta learner: BAM/MSANet meta-training on base-class episodes (query, one base class in it,
   ``shot`` supports of that class), loss CE(final) + aux_weight1 * CE(meta); backbone and base
   learner frozen, BN frozen when ``fix_bn`` (reference keys: epochs, batch_size, base_lr, power).

The backbone runs in eval mode (ImageNet or random weights, BN statistics frozen), so its
features of every train image are computed once and kept (float16), and once more after stage 1
when layer4 learnt. Every image goes through the evaluation geometry at ``train_h`` (long side
scaled, padded square canvas): no scale/rotate/crop augmentation, only random horizontal flips
of the cached maps in stage 1. Writes ``{weights_root}/{data_set}/split{split}/{backbone}/{weight}``
with float16 tensors and TensorBoard curves under
``{exp_root}/{data_set}/train/split{split}/{backbone}``. An existing checkpoint file (the
committed demo models among them) is never replaced without ``--overwrite``: set
``weights_root``/``weight`` to write elsewhere. Input errors end with one message (exit 2 for
config and usage), the traceback only with ``--debug``.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tensorboardX import SummaryWriter
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset.demo import ensure_demo_present
from dataset.episodes import EpisodeSampler
from dataset.features import FeatureStore
from dataset.fewshot import build_episode_dataset, to_device
from dataset.images import ImageSet
from dataset.lists import fss_list_files, read_data_list, read_sub_class_file_list
from dataset.splits import base_classes, base_label_lut, novel_classes
from evaluation.records import Scores, episode_record
from model import FewShotModel, build_model
from model.base import BACKBONE_MODULES
from model.contract import IGNORE
from util.checkpoint import (base_weight_path, checkpoint_path, imagenet_weights_file, load_imagenet_backbone,
                              load_pspnet, save_base, save_checkpoint)
from util.config import (MIN_VAL_SIZE, backbone_name, config_summary, config_warnings,
                         load_config)
from util.distributed import choose_device
from util.errors import ConfigError, UsageError, user_errors
from util.paths import repo_path

log = logging.getLogger("train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint file")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: key value ...")
    return parser.parse_args(argv)


def init_backbone(model: FewShotModel, cfg) -> None:
    """ImageNet weights into the frozen backbone (only MobileNetV2's can be installed here)."""
    if cfg.init_backbone == "none":
        return
    if backbone_name(cfg) != "mobilenetv2":
        raise ConfigError(f"init_backbone 'imagenet' is available for mobilenetv2 only, not "
                          f"{backbone_name(cfg)!r}; use init_backbone none")
    load_imagenet_backbone(model, imagenet_weights_file(), "mobilenetv2")


def make_optimizer(groups: list[tuple[list[nn.Parameter], float]], cfg) -> torch.optim.SGD:
    """SGD over (parameters, initial learning rate) groups; ``sgd_step`` decays every rate."""
    return torch.optim.SGD([{"params": params, "lr": lr, "initial_lr": lr} for params, lr in groups],
                           momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def sgd_step(optimizer: torch.optim.Optimizer, loss: Tensor, it: int, total: int, power: float) -> float:
    """One optimiser step at the poly learning rates of step ``it``; returns the first group's."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * (1 - it / total) ** power
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return optimizer.param_groups[0]["lr"]


def train_base_learner(model: FewShotModel, store: FeatureStore, lut: Tensor, cfg, writer, device) -> list[float]:
    """Stage 1: PPM + classifier on the cached layer4 maps; returns the loss of every step.

    With ``base_learner_layer4_lr`` > 0 the backbone's layer4 learns too, on the cached layer3
    maps, as a PSPNet's backbone does (its BN statistics stay frozen); the caller must then
    compute the features again."""
    head = model.learner_base.train()
    tune = cfg.base_learner_layer4_lr > 0
    groups = [(list(head.parameters()), cfg.base_learner_lr)]
    if tune:
        model.layer4.requires_grad_(True)
        groups.append((list(model.layer4.parameters()), cfg.base_learner_layer4_lr))
    optimizer = make_optimizer(groups, cfg)
    n, generator = len(store.labels), torch.Generator().manual_seed(cfg.manual_seed)
    steps = n // cfg.batch_size  # the last incomplete batch of an epoch is dropped
    total, losses = cfg.base_learner_epochs * steps, []
    for it in tqdm(range(total), desc="stage 1: base learner", dynamic_ncols=True):
        if it % steps == 0:
            order = torch.randperm(n, generator=generator)
        items = order[it % steps * cfg.batch_size:(it % steps + 1) * cfg.batch_size]
        maps = store.layer3(items, device) if tune else store.layer4(items, device)
        target = lut[store.labels[items].long()].to(device)
        flip = (torch.rand(len(items), generator=generator) < 0.5).to(device)  # horizontal flips
        maps = torch.where(flip[:, None, None, None], maps.flip(-1), maps)
        target = torch.where(flip[:, None, None], target.flip(-1), target)
        logits = head(model.layer4(maps) if tune else maps)
        logits = F.interpolate(logits, target.shape[-2:], mode="bilinear", align_corners=True)
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE)
        lr = sgd_step(optimizer, loss, it, total, cfg.power)
        losses.append(loss.item())
        writer.add_scalar("stage1/loss", losses[-1], it)
        writer.add_scalar("stage1/lr", lr, it)
    head.requires_grad_(False)
    model.layer4.requires_grad_(False)
    return losses


def class_masks(labels: Tensor, classes: Tensor) -> Tensor:
    """Class ids [B,...,S,S] -> 0/1/255 masks of the per-episode class [B] (as dataset.fewshot)."""
    chosen = classes.view(-1, *[1] * (labels.dim() - 1))
    return torch.where(labels == IGNORE, IGNORE, (labels == chosen).long())


def train_meta_learner(model: FewShotModel, store: FeatureStore, sampler: EpisodeSampler, lut: Tensor,
                       cfg, writer, device) -> dict[str, list[float]]:
    """Stage 2: meta-training of everything but the backbone and the base learner."""
    model.train()  # backbone and learner_base stay in eval mode
    if cfg.fix_bn:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer([(params, cfg.base_lr)], cfg)
    rng = np.random.default_rng(cfg.manual_seed)
    total = cfg.epochs * sampler.steps_per_epoch
    episodes = itertools.chain.from_iterable(sampler.epoch(rng) for _ in range(cfg.epochs))
    history: dict[str, list[float]] = {"loss": [], "final": [], "meta": [], "base": []}
    for it, (queries, classes, supports) in enumerate(tqdm(episodes, desc="stage 2: meta learner", total=total,
                                                             dynamic_ncols=True)):
        b, k = supports.shape
        query = store.batch(torch.from_numpy(queries), device)
        support = store.batch(torch.from_numpy(supports.reshape(-1)), device)
        classes = torch.from_numpy(classes)
        query_labels = store.labels[torch.from_numpy(queries)].long()
        target = class_masks(query_labels, classes).to(device)
        masks = class_masks(store.labels[torch.from_numpy(supports)].long(), classes).to(device)
        with torch.no_grad():  # parameter-free statistics of frozen features
            stats = model.match(query, support, masks)
        embeddings = model.embed(support)
        guidance = model.guide(stats, embeddings.reshape(b, k, *embeddings.shape[1:]))
        # BAM's training leaves the episode's own class out of the base learner's map.
        pred = model.decode(query, guidance, exclude=lut[classes].to(device))
        final = F.cross_entropy(pred.final, target, ignore_index=IGNORE)
        meta = F.cross_entropy(pred.meta, target, ignore_index=IGNORE)
        loss = final + cfg.aux_weight1 * meta
        lr = sgd_step(optimizer, loss, it, total, cfg.power)
        with torch.no_grad():  # the frozen base learner's loss, for the record
            base = F.cross_entropy(pred.base, lut[query_labels].to(device), ignore_index=IGNORE)
        for name, value in (("loss", loss), ("final", final), ("meta", meta), ("base", base)):
            history[name].append(value.item())
            writer.add_scalar("stage2/loss" if name == "loss" else f"stage2/loss_{name}", value.item(), it)
        writer.add_scalar("stage2/lr", lr, it)
    return history


@torch.no_grad()
def validate(model: FewShotModel, cfg, device: torch.device, writer: SummaryWriter) -> dict:
    """The meta-test protocol's scores on ``val_episodes`` novel-class episodes (seed manual_seed)."""
    model.eval()
    val_cfg = type(cfg)(cfg, test_num=cfg.val_episodes, episode_file="")
    dataset, _ = build_episode_dataset(val_cfg, cfg.manual_seed)
    scores = Scores(len(novel_classes(cfg.data_set, cfg.split, cfg.use_split_coco)),
                    len(base_classes(cfg.data_set, cfg.split, cfg.use_split_coco)))
    loader = DataLoader(dataset, batch_size=None, num_workers=cfg.workers)
    for index, item in enumerate(tqdm(loader, desc="validation", dynamic_ncols=True)):
        batch = to_device(item, device)
        pred = model(batch["query_img"], batch["support_imgs"], batch["support_masks"])
        scores.add(episode_record(index, batch, pred, None, scores.base.num_classes))
    val = scores.summary(with_eftnet=False)
    for name, value in (("miou", val["zero"]["miou"]), ("fbiou", val["zero"]["fbiou"]),
                        ("miou_meta", val["zero"]["miou_meta"]), ("base_miou", val["base_miou"])):
        writer.add_scalar(f"val/{name}", value, 0)
    return val


def check_checkpoint_target(path: Path, overwrite: bool) -> None:
    """Refuse, before any work, to replace an existing checkpoint (a committed demo model, a
    released file) unless asked to."""
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists and would be replaced: pass --overwrite, or set weights_root / weight "
                         "(e.g. --opts weights_root exp/weights) to write elsewhere")
    if path.is_dir():
        raise UsageError(f"the checkpoint path {path} is a folder: set weight to a file name")


class Laps:
    """Wall-clock seconds of consecutive phases: ``laps(name)`` ends the phase ``name``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name], self._last = now - self._last, now


def check_training_keys(cfg) -> None:
    """The config keys training reads beyond those load_config checks (ConfigError)."""
    if cfg.train_h != cfg.train_w:
        raise ConfigError(f"train_h and train_w must be equal (a square canvas), got {cfg.train_h} and {cfg.train_w}")
    if cfg.train_h < MIN_VAL_SIZE or (cfg.train_h - 1) % 8:
        raise ConfigError(f"train_h must be 8k+1 and >= {MIN_VAL_SIZE} (the reference's geometry, e.g. 473), "
                          f"got {cfg.train_h}")
    for key in ("base_learner_epochs", "epochs", "batch_size"):
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be >= 1 for training, got {cfg[key]}")
    if cfg.val_episodes < 0:
        raise ConfigError(f"val_episodes must be >= 0, got {cfg.val_episodes}")


def main(argv: list[str] | None = None) -> dict:
    """The command line: see ``run``; a user's mistake exits with one message."""
    args = parse_args(argv)
    with user_errors("train.py", args.debug):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    """Train both stages (stage 1 only without a base file to reuse), validate, save; returns the
    loss histories, checkpoint path and scores."""
    cfg = load_config(args.config, args.opts)
    check_training_keys(cfg)
    path, base = checkpoint_path(cfg), base_weight_path(cfg)
    check_checkpoint_target(path, args.overwrite)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    log.info("config %s\n%s", args.config, config_summary(cfg))
    for warning in config_warnings(cfg):  # val_size: the validation's geometry
        log.warning(warning)
    laps = Laps()
    random.seed(cfg.manual_seed)
    np.random.seed(cfg.manual_seed)
    torch.manual_seed(cfg.manual_seed)
    device = choose_device(cfg.device)
    data_list, sampler = training_lists(cfg)
    lut = torch.from_numpy(base_label_lut(cfg.data_set, cfg.split, cfg.use_split_coco)).long()
    model = build_model(cfg)
    reuse_base = base is not None and base.is_file()
    if reuse_base:  # the fold's base learner, shared by its checkpoints: stage 1 is done
        load_pspnet(model, base)
        log.info("stage 1: reusing the base file %s (delete it to train the base learner again)", base)
    else:
        init_backbone(model, cfg)
    model.to(device).eval()
    for name in BACKBONE_MODULES:
        getattr(model, name).requires_grad_(False)
    writer = SummaryWriter(str(repo_path(cfg.exp_root) / cfg.data_set / "train" / f"split{cfg.split}" /
                               backbone_name(cfg)))
    laps("setup")
    images = DataLoader(ImageSet(data_list, cfg.train_h), batch_size=16, num_workers=cfg.workers)
    store = FeatureStore(model, images, device)
    laps("features")
    base_losses = [] if reuse_base else train_base_learner(model, store, lut, cfg, writer, device)
    if base_losses and cfg.base_learner_layer4_lr > 0:  # layer4 learnt: its maps are out of date
        store = FeatureStore(model, images, device)
    if base is not None and not reuse_base:
        save_base(model, base, cfg.base_learner_epochs)
        log.info("saved the base file %s", base)
    store.add_base_logits(device)
    laps("stage1")
    meta_history = train_meta_learner(model, store, sampler, lut, cfg, writer, device)
    laps("stage2")
    del store
    save_checkpoint(model, path, cfg.epochs, without_base=base is not None)
    log.info("saved %s", path)
    val = validate(model, cfg, device, writer) if cfg.val_episodes else None
    if val is not None:
        laps("validation")
    writer.close()
    seconds = laps.seconds | {"total": sum(laps.seconds.values())}
    report(cfg, path, seconds, val)
    return {"checkpoint": str(path), "base_weight": None if base is None else str(base), "base_losses": base_losses,
            "meta_losses": meta_history["loss"], "meta_history": meta_history, "validation": val, "seconds": seconds}


def training_lists(cfg) -> tuple[list, EpisodeSampler]:
    """The fold's train images (the BAM train list) and the meta-training episodes over them."""
    data_root = repo_path(cfg.data_root)
    if cfg.data_set == "demo":  # the built-in benchmark is generated on first use
        ensure_demo_present(data_root)
    data_path, sub_path = fss_list_files(repo_path(cfg.lists_root), cfg.data_set, "train", cfg.split)
    data_list = read_data_list(str(data_path), str(data_root))
    sub_lists = read_sub_class_file_list(str(sub_path), str(data_root))
    return data_list, EpisodeSampler(data_list, sub_lists, cfg.shot, cfg.batch_size)


def report(cfg, path: Path, seconds: dict[str, float], val: dict | None) -> None:
    """The run's summary line and its validation scores, on stdout."""
    summary = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    print(f"{cfg.data_set} fold {cfg.split} {backbone_name(cfg)} {cfg.arch} {cfg.shot}-shot -> {path} ({summary})")
    if val is not None:
        print(f"validation, {val['episodes']} episodes: mIoU {100 * val['zero']['miou']:.2f}, "
              f"FB-IoU {100 * val['zero']['fbiou']:.2f}, meta mIoU {100 * val['zero']['miou_meta']:.2f}, "
              f"base-class mIoU {100 * val['base_miou']:.2f}")


if __name__ == "__main__":
    main()
