"""Train a few-shot base model (MSANet, BAM or HSNet) on a fold's base classes.

    python train.py --config CONFIG.yaml [--then key value ...]... [--opts key value ...]

MSANet and BAM train in two stages (below). HSNet, which has no base learner, trains in one:
its hypercorrelation learner on 1-shot base-class episodes (loss: cross-entropy of its logits),
with Adam at the constant rate ``base_lr`` as HSNet's own training does, over the frozen
ImageNet backbone's maps kept once (float16); ``base_weight_hsnet``, when set, names the file
that keeps the frozen backbone beside the fold's learner-only checkpoint (written when absent).

Each ``--then`` trains one more checkpoint of the fold (another shot, arch or schedule) on the
same features and base file, as its own command would train it, without computing them again.

1. Base learner: ``learner_base`` (PPM + classifier, as PSPNet's) learns to segment the base
   classes on every image of ``train_list`` (background 0, base classes 1..n, novel classes
   background, 255 ignored), as BAM's train_base.py does on the whole train set; with
   ``base_learner_layer4_lr`` > 0 the backbone's last stage (layer4) learns with it, as a
   PSPNet's backbone does, and is then frozen like the rest for stage 2 and meta-testing.
2. Meta learner: BAM/MSANet meta-training on base-class episodes (query, one base class in it,
   ``shot`` supports of that class), loss CE(final) + aux_weight1 * CE(meta); backbone and base
   learner frozen, BN frozen when ``fix_bn`` (reference keys: epochs, batch_size, base_lr, power).

The backbone runs in eval mode (ImageNet or random weights, BN statistics frozen), so its
maps are computed once per stage and kept (float16): stage 1's input stage (layer3 when layer4
learns, else layer4) of the train_list images, then, after stage 1, every field of the fold's
meta-training images. BAM's steps would also run layer4 on every support's layer3 masked by its
class: those maps are computed once per checkpoint for every (image, class) a support can be
(float32, within ``support_cache_mb``), in batches of a step's size, so they are bitwise what
the steps would compute. Every image goes through the evaluation geometry at ``train_h`` (long
side scaled, padded square canvas): no scale/rotate/crop augmentation, only random horizontal
flips of the cached maps in stage 1. Writes
``{weights_root}/{data_set}/split{split}/{backbone}/{weight}`` with float16 tensors and
TensorBoard curves under ``{exp_root}/{data_set}/train/split{split}/{backbone}``. An existing
checkpoint file (the committed demo models among them) is never replaced without
``--overwrite``: set ``weights_root``/``weight`` to write elsewhere. Input errors end with one
message (exit 2 for config and usage), the traceback only with ``--debug``.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import sys
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
from dataset.fewshot import build_episode_dataset, to_device
from dataset.images import ImageSet
from dataset.lists import fss_list_files, read_data_list, read_sub_class_file_list
from dataset.splits import base_classes, base_label_lut, novel_classes
from evaluation.records import Scores, episode_record
from model import ARCHS, FewShotModel, PrototypeModel, build_model
from model.bam import BAM
from model.contract import IGNORE
from training.checks import check_checkpoint_target, check_distinct_targets, check_shared, check_training_keys
from training.features import FeatureStore, TapStore, class_masks, keep_masked_supports, layer_maps
from training.laps import Laps
from training.optimizer import make_optimizer, sgd_step
from training.state import frozen, round_as_saved, seed_everything
from util.checkpoint import (base_weight_path, checkpoint_path, imagenet_weights_file, load_imagenet_backbone,
                              load_pspnet, save_backbone, save_base, save_checkpoint, trained_for)
from util.config import backbone_name, config_summary, config_warnings, load_config
from util.distributed import choose_device
from util.errors import ConfigError, UsageError, user_errors
from util.paths import repo_path

log = logging.getLogger("train")


def main(argv: list[str] | None = None) -> list[dict]:
    """The command line: see ``run``; a user's mistake exits with one message."""
    args = parse_args(argv)
    with user_errors("train.py", args.debug):
        return run(args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint file")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    parser.add_argument("--then", nargs="+", action="append", default=[], metavar="KEY VALUE",
                        help="one more checkpoint on the same features and base file, with these overrides on top "
                             "of --opts (e.g. --then shot 5 --then arch BAM epochs 4); before --opts")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: key value ...")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    """Train the checkpoint of the config and one more per --then, on one computation of the
    features: stage 1 only without a base file to reuse; per checkpoint stage 2, save, validate.
    Returns, per checkpoint, its loss histories, path, scores and phase times. Each checkpoint
    is the one its own command (without --then) trains."""
    cfgs = [load_config(args.config, args.opts)] + [
        load_config(args.config, args.opts + opts, source=f"--then {' '.join(opts)}") for opts in args.then]
    for cfg in cfgs:
        check_training_keys(cfg)
        check_checkpoint_target(checkpoint_path(cfg), args.overwrite)
    if not ARCHS[cfgs[0].arch].predicts_base_classes:
        if args.then:
            raise UsageError(f"--then trains more checkpoints on one base learner; {cfgs[0].arch} has none: train "
                             "each checkpoint with a command of its own")
        return [train_learner_only(cfgs[0])]
    check_shared(cfgs, args.then)
    check_distinct_targets(cfgs, args.then)
    cfg, base = cfgs[0], base_weight_path(cfgs[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    log.info("config %s\n%s", args.config, config_summary(cfg))
    for warning in config_warnings(cfg):  # val_size: the validation's geometry
        log.warning(warning)
    laps = Laps()
    seed_everything(cfg.manual_seed)
    device = choose_device(cfg.device)
    data_list, sub_lists = training_lists(cfg)
    reuse_base = base is not None and base.is_file()
    base_list = None if reuse_base else base_learner_list(cfg)
    lut = torch.from_numpy(base_label_lut(cfg.data_set, cfg.split, cfg.use_split_coco)).long()
    novel = novel_classes(cfg.data_set, cfg.split, cfg.use_split_coco)
    model = build_model(cfg)
    if reuse_base:  # the fold's base learner, shared by its checkpoints: stage 1 is done
        load_pspnet(model, base, trained_for(cfg, novel, with_model=False))
        log.info("stage 1: reusing the base file %s (delete it to train the base learner again)", base)
    else:
        init_backbone(model, cfg)
    frozen(model, device)
    logdir = str(repo_path(cfg.exp_root) / cfg.data_set / "train" / f"split{cfg.split}" / backbone_name(cfg))
    writer = SummaryWriter(logdir)
    laps("setup")
    base_losses = [] if reuse_base else train_base_learner(model, image_loader(base_list, cfg), lut, cfg, writer,
                                                           device)
    round_as_saved(model)
    if base is not None and not reuse_base:
        save_base(model, base, cfg.base_learner_epochs, trained_for(cfg, novel, with_model=False))
        log.info("saved the base file %s", base)
    laps("stage1")
    store = FeatureStore(model, image_loader(data_list, cfg), device)
    store.add_base_logits(device)
    laps("features")
    results = []
    for index, cfg in enumerate(cfgs):
        if index:  # as its own command would: seeded, built, the base file loaded
            laps, writer = Laps(), SummaryWriter(logdir)
            seed_everything(cfg.manual_seed)
            model = build_model(cfg)
            load_pspnet(model, base)
            frozen(model, device)
            laps("setup")
        results.append(meta_train(model, store, EpisodeSampler(data_list, sub_lists, cfg.shot, cfg.batch_size),
                                  lut, cfg, writer, device, laps))
    results[0]["base_losses"] = base_losses
    return results


def train_learner_only(cfg) -> dict:
    """A model without a base learner (HSNet): the frozen ImageNet backbone's maps kept once,
    then its learner on base-class episodes; save, validate and report."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    log.info("config\n%s", config_summary(cfg))
    laps = Laps()
    seed_everything(cfg.manual_seed)
    device = choose_device(cfg.device)
    data_list, sub_lists = training_lists(cfg)
    model = build_model(cfg)
    init_backbone(model, cfg)
    frozen(model, device)
    round_as_saved(model)
    base = base_weight_path(cfg)
    if base is not None and not base.is_file():
        save_backbone(model, base, {"backbone": backbone_name(cfg)})
        log.info("saved the backbone file %s", base)
    writer = SummaryWriter(str(repo_path(cfg.exp_root) / cfg.data_set / "train" / f"split{cfg.split}" /
                               backbone_name(cfg) / cfg.arch))
    laps("setup")
    store = TapStore(model, image_loader(data_list, cfg), device)
    laps("features")
    losses = train_learner(model, store, EpisodeSampler(data_list, sub_lists, cfg.shot, cfg.batch_size), cfg,
                           writer, device)
    laps("training")
    return save_and_validate(model, cfg, writer, device, laps, losses)


def train_learner(model: FewShotModel, store: TapStore, sampler: EpisodeSampler, cfg, writer,
                  device: torch.device) -> list[float]:
    """The learner of a model without a base learner on base-class episodes; the loss of every step."""
    model.train()  # the backbone stays in eval mode
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.base_lr)  # as HSNet trains: Adam, constant rate
    rng = np.random.default_rng(cfg.manual_seed)
    total = cfg.epochs * sampler.steps_per_epoch
    episodes = itertools.chain.from_iterable(sampler.epoch(rng) for _ in range(cfg.epochs))
    losses = []
    for it, (queries, classes, supports) in enumerate(tqdm(episodes, desc="learner", total=total, dynamic_ncols=True)):
        b, k = supports.shape
        classes = torch.from_numpy(classes)
        query = store.batch(torch.from_numpy(queries), device)
        support = store.batch(torch.from_numpy(supports.reshape(-1)), device)
        target = class_masks(store.labels[torch.from_numpy(queries)].long(), classes).to(device)
        masks = class_masks(store.labels[torch.from_numpy(supports)].long(), classes).to(device)
        embeddings = model.embed(support)
        guidance = model.guide(model.match(query, support, masks), embeddings.reshape(b, k, *embeddings.shape[1:]))
        loss = model.adaptation_loss(model.decode(query, guidance), target, cfg.aux_weight1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        writer.add_scalar("learner/loss", losses[-1], it)
    model.eval()
    return losses


def training_lists(cfg) -> tuple[list, dict]:
    """The fold's meta-training images (the BAM train list) and its images per base class."""
    data_root = repo_path(cfg.data_root)
    if cfg.data_set == "demo":  # the built-in benchmark is generated on first use
        ensure_demo_present(data_root)
    data_path, sub_path = fss_list_files(repo_path(cfg.lists_root), cfg.data_set, "train", cfg.split)
    return read_data_list(str(data_path), str(data_root)), read_sub_class_file_list(str(sub_path), str(data_root))


def base_learner_list(cfg) -> list:
    """Stage 1's images: every one of ``train_list`` (novel classes become background through
    the base-label table), as BAM's train_base.py trains its PSPNet on the whole train set."""
    if not cfg.train_list:
        raise ConfigError("train_list is empty: stage 1 trains the base learner on it (every train image, novel "
                          "classes as background; the demo's is data/demo/lists/demo/train.txt), or set base_weight "
                          "to an existing base file to skip stage 1")
    return read_data_list(str(repo_path(cfg.train_list)), str(repo_path(cfg.data_root)))


def image_loader(data_list: list, cfg) -> DataLoader:
    """Images and labels of a list in the evaluation geometry at ``train_h``, in list order."""
    return DataLoader(ImageSet(data_list, cfg.train_h), batch_size=16, num_workers=cfg.workers)


def init_backbone(model: FewShotModel, cfg) -> None:
    """ImageNet weights into the frozen backbone (only MobileNetV2's can be installed here)."""
    if cfg.init_backbone == "none":
        return
    if backbone_name(cfg) != "mobilenetv2":
        raise ConfigError(f"init_backbone 'imagenet' is available for mobilenetv2 only, not "
                          f"{backbone_name(cfg)!r}; use init_backbone none")
    load_imagenet_backbone(model, imagenet_weights_file(), "mobilenetv2")


def train_base_learner(model: PrototypeModel, images: DataLoader, lut: Tensor, cfg, writer, device) -> list[float]:
    """Stage 1: PPM + classifier on the cached layer4 maps of ``images``; returns the loss of
    every step.

    With ``base_learner_layer4_lr`` > 0 the backbone's layer4 learns too, on the cached layer3
    maps, as a PSPNet's backbone does (its BN statistics stay frozen)."""
    head = model.learner_base.train().requires_grad_(True)
    tune = cfg.base_learner_layer4_lr > 0
    maps, labels = layer_maps(model, images, device, "layer3" if tune else "layer4")
    groups = [(list(head.parameters()), cfg.base_learner_lr)]
    if tune:
        model.layer4.requires_grad_(True)
        groups.append((list(model.layer4.parameters()), cfg.base_learner_layer4_lr))
    optimizer = make_optimizer(groups, cfg)
    n, generator = len(labels), torch.Generator().manual_seed(cfg.manual_seed)
    steps = n // cfg.batch_size  # the last incomplete batch of an epoch is dropped
    total, losses = cfg.base_learner_epochs * steps, []
    for it in tqdm(range(total), desc="stage 1: base learner", dynamic_ncols=True):
        if it % steps == 0:
            order = torch.randperm(n, generator=generator)
        items = order[it % steps * cfg.batch_size:(it % steps + 1) * cfg.batch_size]
        batch = maps[items].to(device, torch.float32)
        target = lut[labels[items].long()].to(device)
        flip = (torch.rand(len(items), generator=generator) < 0.5).to(device)  # horizontal flips
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        target = torch.where(flip[:, None, None], target.flip(-1), target)
        logits = head(model.layer4(batch) if tune else batch)
        logits = F.interpolate(logits, target.shape[-2:], mode="bilinear", align_corners=True)
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE)
        lr = sgd_step(optimizer, loss, it, total, cfg.power)
        losses.append(loss.item())
        writer.add_scalar("stage1/loss", losses[-1], it)
        writer.add_scalar("stage1/lr", lr, it)
    head.requires_grad_(False)
    model.layer4.requires_grad_(False)
    return losses


def meta_train(model: PrototypeModel, store: FeatureStore, sampler: EpisodeSampler, lut: Tensor, cfg, writer,
               device: torch.device, laps: Laps) -> dict:
    """Stage 2 of one checkpoint, then save, validate and report."""
    seed_everything(cfg.manual_seed)  # the same dropout masks whether or not stage 1 ran before
    meta_history = train_meta_learner(model, store, sampler, lut, cfg, writer, device)
    laps("stage2")
    return save_and_validate(model, cfg, writer, device, laps, meta_history["loss"]) | {"meta_history": meta_history}


def save_and_validate(model: FewShotModel, cfg, writer, device: torch.device, laps: Laps, losses: list[float]) -> dict:
    """Save the trained checkpoint (without what the base file holds, when there is one),
    validate, report; the run's record."""
    path, base = checkpoint_path(cfg), base_weight_path(cfg)
    novel = novel_classes(cfg.data_set, cfg.split, cfg.use_split_coco)
    save_checkpoint(model, path, cfg.epochs, trained_for(cfg, novel, with_shot=model.weights_depend_on_shot),
                    without_base=base is not None)
    log.info("saved %s", path)
    val = validate(model, cfg, device, writer) if cfg.val_episodes else None
    if val is not None:
        laps("validation")
    writer.close()
    seconds = laps.seconds | {"total": sum(laps.seconds.values())}
    report(cfg, path, seconds, val)
    return {"checkpoint": str(path), "base_weight": None if base is None else str(base), "base_losses": [],
            "meta_losses": losses, "validation": val, "seconds": seconds}


def train_meta_learner(model: PrototypeModel, store: FeatureStore, sampler: EpisodeSampler, lut: Tensor,
                       cfg, writer, device) -> dict[str, list[float]]:
    """Stage 2: meta-training of everything but the backbone and the base learner."""
    model.train()  # backbone and learner_base stay in eval mode
    if cfg.fix_bn:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer([(params, cfg.base_lr)], cfg)
    if isinstance(model, BAM):
        keep_masked_supports(model, store, sampler, cfg.support_cache_mb, device)
    rng = np.random.default_rng(cfg.manual_seed)
    total = cfg.epochs * sampler.steps_per_epoch
    episodes = itertools.chain.from_iterable(sampler.epoch(rng) for _ in range(cfg.epochs))
    history: dict[str, list[float]] = {"loss": [], "final": [], "meta": [], "base": []}
    for it, (queries, classes, supports) in enumerate(tqdm(episodes, desc="stage 2: meta learner", total=total,
                                                             dynamic_ncols=True)):
        b, k = supports.shape
        query = store.batch(torch.from_numpy(queries), device)
        classes = torch.from_numpy(classes)
        support = store.batch(torch.from_numpy(supports.reshape(-1)), device, classes.repeat_interleave(k))
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
    store.drop_masked_layer4()
    return history


@torch.no_grad()
def validate(model: FewShotModel, cfg, device: torch.device, writer: SummaryWriter) -> dict:
    """The meta-test protocol's scores on ``val_episodes`` novel-class episodes (seed manual_seed)."""
    model.eval()
    val_cfg = type(cfg)(cfg, test_num=cfg.val_episodes, episode_file="")
    dataset, _ = build_episode_dataset(val_cfg, cfg.manual_seed)
    num_base = len(base_classes(cfg.data_set, cfg.split, cfg.use_split_coco)) if model.predicts_base_classes else 0
    scores = Scores(len(novel_classes(cfg.data_set, cfg.split, cfg.use_split_coco)), num_base)
    loader = DataLoader(dataset, batch_size=None, num_workers=cfg.workers)
    for index, item in enumerate(tqdm(loader, desc="validation", dynamic_ncols=True)):
        batch = to_device(item, device)
        pred = model(batch["query_img"], batch["support_imgs"], batch["support_masks"])
        scores.add(episode_record(index, batch, pred, None, num_base))
    val = scores.summary(with_eftnet=False)
    for name, value in (("miou", val["zero"]["miou"]), ("fbiou", val["zero"]["fbiou"]),
                        ("miou_meta", val["zero"]["miou_meta"]), ("base_miou", val["base_miou"])):
        if value is not None:
            writer.add_scalar(f"val/{name}", value, 0)
    return val


def report(cfg, path: Path, seconds: dict[str, float], val: dict | None) -> None:
    """The run's summary line and its validation scores, on stdout."""
    summary = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    print(f"{cfg.data_set} fold {cfg.split} {backbone_name(cfg)} {cfg.arch} {cfg.shot}-shot -> {path} ({summary})")
    if val is not None:
        base = "" if val["base_miou"] is None else f", base-class mIoU {100 * val['base_miou']:.2f}"
        print(f"validation, {val['episodes']} episodes: mIoU {100 * val['zero']['miou']:.2f}, "
              f"FB-IoU {100 * val['zero']['fbiou']:.2f}, meta mIoU {100 * val['zero']['miou_meta']:.2f}{base}")


if __name__ == "__main__":
    main()
