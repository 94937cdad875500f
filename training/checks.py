"""What a training command checks before any work: the keys training reads beyond those
load_config checks, the checkpoint files it would write, and what its checkpoints share."""
from __future__ import annotations

from pathlib import Path

from util.checkpoint import checkpoint_path
from util.config import MIN_VAL_SIZE
from util.errors import ConfigError, UsageError

# What the checkpoints of one command share (images, backbone features, base learner): a
# --then may change anything else (shot, arch, epochs, weight, ...).
SHARED_KEYS = ("data_set", "data_root", "lists_root", "train_list", "split", "use_split_coco", "train_h", "train_w",
               "backbone", "layers", "vgg", "base_width", "init_backbone", "weights_root", "base_weight",
               "base_learner_epochs", "base_learner_lr", "base_learner_layer4_lr", "device", "workers")


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


def check_checkpoint_target(path: Path, overwrite: bool) -> None:
    """Refuse, before any work, to replace an existing checkpoint (a committed demo model, a
    released file) unless asked to."""
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists and would be replaced: pass --overwrite, or set weights_root / weight "
                         "(e.g. --opts weights_root exp/weights) to write elsewhere")
    if path.is_dir():
        raise UsageError(f"the checkpoint path {path} is a folder: set weight to a file name")


def check_shared(cfgs: list, then: list[list[str]]) -> None:
    """Further checkpoints (--then) share the first one's features and base file (UsageError)."""
    if len(cfgs) > 1 and not cfgs[0].base_weight:
        raise UsageError("--then needs base_weight: the checkpoints of one command share a base file")
    for cfg, opts in zip(cfgs[1:], then):
        for key in SHARED_KEYS:
            if cfg[key] != cfgs[0][key]:
                raise UsageError(f"--then {' '.join(opts)}: {key} {cfg[key]!r} differs from the first checkpoint's "
                                 f"{cfgs[0][key]!r}; the checkpoints of one command share its images, features and "
                                 "base learner: train this one with a command of its own")


def check_distinct_targets(cfgs: list, then: list[list[str]]) -> None:
    """Each checkpoint of one command goes to a file of its own (UsageError): a --then that
    writes the file of an earlier checkpoint would replace it, --overwrite or not."""
    names = ["the config's checkpoint"] + [f"--then {' '.join(opts)}" for opts in then]
    written: dict[Path, str] = {}
    for cfg, name in zip(cfgs, names):
        path = checkpoint_path(cfg)
        if path in written:
            raise UsageError(f"{name} would write {path}, as {written[path]} does, and replace it: give it a file of "
                             f"its own (add `weight NAME` to the --then, or set the config's weight_5shot / weight_bam "
                             "/ weight_bam_5shot)")
        written[path] = name
