"""Load and check EFTNet configuration files.

A config file is YAML with sections (Data, Train, Method, Test_Finetune, ...). As in the
reference code the sections are flattened into one namespace, so a key may appear in only one
section. Every key must be declared in SCHEMA, whose default value also fixes the key's type;
values from the file and from ``--opts`` are checked against it, and missing keys take the
default.

5-shot rule: after the opts are applied, if ``shot > 1``, ``weight`` was not given in the opts
and ``weight_5shot`` is non-empty, then ``weight`` becomes ``weight_5shot``. So
``--opts shot 5`` picks the fold's released 5-shot checkpoint, while an explicit
``--opts weight X`` always wins.
"""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from util.errors import UsageError

REPO_ROOT = Path(__file__).resolve().parent.parent

# Every known key with its default; the default's type is the key's type.
SCHEMA: dict[str, Any] = {
    # Data
    "data_root": "", "base_data_root": "", "train_list": "", "val_list": "", "classes": 2,
    # Train (most of these only matter for meta-training and are kept for compatibility)
    "train_h": 473, "train_w": 473, "val_size": 473,
    "scale_min": 0.9, "scale_max": 1.1, "rotate_min": -10, "rotate_max": 10,
    "ignore_label": 255, "padding_label": 255,
    "split": 0, "shot": 1, "data_set": "pascal", "use_split_coco": False,
    "batch_size": 8, "base_lr": 0.005, "epochs": 200, "start_epoch": 0, "stop_interval": 75,
    "index_split": -1, "power": 0.9, "momentum": 0.9, "weight_decay": 0.0001, "warmup": False,
    "print_freq": 10, "save_freq": 10, "resume": "",
    "evaluate": True, "SubEpoch_val": True, "fix_random_seed_val": True,
    "batch_size_val": 1, "resized_val": True, "ori_resize": True,
    "workers": 8, "fix_bn": True, "manual_seed": 123, "seed_deterministic": False,
    "zoom_factor": 8,
    # Method
    "layers": 50, "vgg": False, "aux_weight1": 1.0, "aux_weight2": 1.0,
    "sr_aux_weight1": 1.0, "sr_aux_weight2": 1.0, "memo_weight": 1.0,
    "low_fea": "layer2", "kshot_trans_dim": 2, "merge": "final", "merge_tau": 0.9,
    # Test_Finetune
    "weight": "", "ann_type": "mask", "loop_ft": True, "show": "", "show_ft": "",
    "ft_base_lr": 0.005, "ft_power": 0.9, "ft_number": 5,
    "change_weighting": [0.8, 0.2], "q2s_filt_para": 0.2,
    # Project keys (not in the reference configs)
    "arch": "MSANet",
    "backbone": "",  # '' = derive from layers/vgg (see backbone_name)
    "reduce_dim": 256,
    "base_width": 512,  # hidden width of the base learner's classifier (512 in every release)
    "s2q_query_mask": "pseudo",  # 'ground_truth' reproduces the reference (reads the query label)
    "q2s_blend": True,  # ablation: False = the q2s prediction uses the real supports only
    # evaluation: also record each round's s2q score with the query label (the reference's selection;
    # never seen by the engine); costs +11 % per episode at 201 px 1-shot, +16 % at 473 px, +42 % at 473 px 5-shot
    "s2q_gt_scores": False,
    "bootstrap_draws": 2000,  # paired bootstrap draws of the selection-rule intervals
    "bootstrap_seed": 2024,  # its fixed seed
    "similarity_cache_mb": 1024,  # EFTNet: memory for similarity products kept across rounds (0 = none)
    "kshot_order_quirk": True,  # reproduce MSANet's k-shot reweighting order bug
    "vgg_l2_last_shot_quirk": True,  # reproduce MSANet's VGG l2 correlation of the last shot
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "test_num": 1000,  # episodes per seed
    "num_seeds": 6,
    "weight_5shot": "",  # 5-shot checkpoint file name of this fold/backbone
    "weight_path": "",  # explicit checkpoint path; overrides weights_root/...
    "weights_root": "weights", "lists_root": "lists", "episode_file": "", "exp_root": "exp",
    "tb_images": 4,  # episodes whose images are logged to TensorBoard
    # train.py (stage 2, meta-training, reads the reference keys epochs, batch_size, base_lr,
    # power, momentum, weight_decay, aux_weight1, fix_bn; these add stage 1 and the set-up)
    "init_backbone": "imagenet",  # frozen backbone weights: 'imagenet' or 'none' (random; tests only)
    "base_learner_epochs": 6,  # stage 1: epochs of base-learner (PPM + classifier) training
    "base_learner_lr": 0.05,  # stage 1: SGD learning rate (poly decay, batch_size images per step)
    "val_episodes": 100,  # novel-class episodes of the quick validation after training (0 = none)
}

CHOICES: dict[str, tuple] = {
    "arch": ("MSANet", "BAM"),
    "s2q_query_mask": ("pseudo", "ground_truth"),
    "data_set": ("pascal", "coco", "demo"),
    "layers": (50, 101),
    "ann_type": ("mask", "bbox"),
    "merge": ("base", "final"),
    "init_backbone": ("imagenet", "none"),
}

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# The smallest canvas: 5x5 feature maps at output stride 8, and images up to 4:1 keep a short
# side of at least 8 pixels after the resize (below that the geometry has no pixels left).
MIN_VAL_SIZE = 33
LEARNING_RATES = ("base_lr", "ft_base_lr", "base_learner_lr")
NON_NEGATIVE = ("workers", "manual_seed", "weight_decay", "momentum", "power", "ft_power",
                "sr_aux_weight1", "aux_weight1", "start_epoch")


class ConfigError(UsageError):
    """A config file or override is invalid (a ValueError; entry scripts exit with 2)."""


class ConfigFileNotFound(FileNotFoundError):
    """The config file does not exist (entry scripts exit with 2, a usage error)."""

    exit_code = UsageError.exit_code


class CfgNode(dict):
    """A flat dict whose keys are also attributes: ``cfg.shot is cfg["shot"]``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key '{name}'") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


def _unknown_key(key: Any, where: str) -> ConfigError:
    close = [f"'{k}'" for k in difflib.get_close_matches(str(key), SCHEMA, n=3)]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}' in {where}{hint}")


def _coerce(key: str, value: Any, where: str) -> Any:
    """Check `value` against the schema type of `key`; return it in that type."""
    expected = type(SCHEMA[key])
    if value is None and expected is str:
        value = ""  # an empty YAML value (`resume:`) means "none"
    elif expected is float and isinstance(value, str):
        try:
            value = float(value)  # PyYAML reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    elif isinstance(value, tuple):
        value = list(value)
    is_bool = isinstance(value, bool)
    if expected is float and isinstance(value, int) and not is_bool:
        value = float(value)
    if not isinstance(value, expected) or (is_bool and expected is not bool):
        raise ConfigError(f"{where}: key '{key}' has value {value!r} of type "
                          f"{type(value).__name__}, expected {expected.__name__}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{where}: key '{key}' must be one of {CHOICES[key]}, got {value!r}")
    return value


def _read_sections(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigFileNotFound(f"config file not found: {path}")
    try:
        with path.open() as f:
            doc = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not a text (UTF-8) YAML file: {err.reason}") from None
    if not isinstance(doc, dict) or not doc:
        raise ConfigError(f"{path}: expected a mapping of sections (Data, Train, ...)")
    values: dict[str, Any] = {}
    section_of: dict[str, str] = {}
    for section, body in doc.items():
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: section '{section}' must be a mapping of keys, "
                              f"got {type(body).__name__}")
        where = f"section '{section}' of {path}"
        for key, value in body.items():
            if key not in SCHEMA:
                raise _unknown_key(key, where)
            if key in section_of:
                raise ConfigError(f"{path}: key '{key}' appears in both section "
                                  f"'{section_of[key]}' and section '{section}'")
            section_of[key] = section
            values[key] = _coerce(key, value, where)
    return values


def _parse_opts(opts: list) -> dict[str, Any]:
    if len(opts) % 2:
        raise ConfigError(f"--opts needs 'key value' pairs, got an odd number of items: {opts}")
    overrides: dict[str, Any] = {}
    for key, raw in zip(opts[::2], opts[1::2]):
        if key not in SCHEMA:
            raise _unknown_key(key, "--opts")
        value = raw
        if isinstance(raw, str):
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw
            if isinstance(SCHEMA[key], str) and value is not None and not isinstance(value, str):
                value = raw  # a file name such as '2024' stays text
        overrides[key] = _coerce(key, value, "--opts")
    return overrides


def _validate(cfg: CfgNode, where: str) -> None:
    cw = cfg.change_weighting
    checks = [
        (cfg.shot >= 1, f"shot must be >= 1, got {cfg.shot}"),
        (cfg.val_size > 0, f"val_size must be a positive int, got {cfg.val_size}"),
        (cfg.classes > 1, f"classes must be > 1, got {cfg.classes}"),
        (0 <= cfg.split <= 3, f"split must be 0..3 for {cfg.data_set} (4 folds), got {cfg.split}"),
        (cfg.val_size >= MIN_VAL_SIZE, f"val_size must be >= {MIN_VAL_SIZE} (the square evaluation canvas, "
                                       f"473 for PASCAL, 641 for COCO), got {cfg.val_size}"),
        (cfg.zoom_factor == 8, f"zoom_factor must be 8 (the models' output stride), got {cfg.zoom_factor}"),
        (not cfg.loop_ft or cfg.ft_number >= 1,
         f"ft_number must be >= 1 when loop_ft is True, got {cfg.ft_number}"),
        (len(cw) == 2 and all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in cw),
         f"change_weighting must be two numbers [real, same-image], got {cw!r}"),
        (0 < cfg.q2s_filt_para <= 1, f"q2s_filt_para must be in (0, 1], got {cfg.q2s_filt_para}"),
        (_DEVICE.fullmatch(cfg.device) is not None,
         f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}"),
        (cfg.test_num >= 1, f"test_num must be >= 1, got {cfg.test_num}"),
        (cfg.num_seeds >= 1, f"num_seeds must be >= 1, got {cfg.num_seeds}"),
        (cfg.tb_images >= 0, f"tb_images must be >= 0, got {cfg.tb_images}"),
        (cfg.bootstrap_draws >= 1000, f"bootstrap_draws must be >= 1000 (a 95% interval), got {cfg.bootstrap_draws}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.momentum < 1, f"momentum must be in [0, 1), got {cfg.momentum}"),
    ]
    checks += [(cfg[key] >= 0, f"{key} must be >= 0 (a learning rate), got {cfg[key]}") for key in LEARNING_RATES]
    checks += [(cfg[key] >= 0, f"{key} must be >= 0, got {cfg[key]}") for key in NON_NEGATIVE]
    checks.append((cfg.manual_seed < 2 ** 32, f"manual_seed must be < 2**32, got {cfg.manual_seed}"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{where}: {message}")
    cfg.change_weighting = [float(w) for w in cw]


def load_config(path: str | Path, opts: list[str] | None = None) -> CfgNode:
    """Read a sectioned YAML config, apply ``--opts`` overrides and check every value.

    `opts` is a flat list ``[key, value, key, value, ...]``; each value is parsed with
    ``yaml.safe_load`` ('5' -> 5, 'True' -> True, '[0.8,0.2]' -> list). Unknown keys, values of
    the wrong type, a key in two sections and invalid values raise ConfigError (a ValueError);
    a missing file raises FileNotFoundError. See the module docstring for the 5-shot rule.
    """
    path = Path(path)
    cfg = CfgNode(copy.deepcopy(SCHEMA))
    cfg.update(_read_sections(path))
    overrides = _parse_opts(list(opts or []))
    cfg.update(overrides)
    if cfg.shot > 1 and "weight" not in overrides and cfg.weight_5shot:
        cfg.weight = cfg.weight_5shot
    _validate(cfg, f"config {path}" + (" with --opts" if overrides else ""))
    return cfg


def config_warnings(cfg: CfgNode) -> list[str]:
    """Values the reference accepts but that change what the numbers mean; a run prints each
    loudly and stores it in its results."""
    warnings = []
    if (cfg.val_size - 1) % 8:
        warnings.append(f"val_size {cfg.val_size} is not 8k+1 (473 for PASCAL, 641 for COCO): with zoom_factor 8 "
                        "the output maps are not aligned with the input grid and the numbers are not comparable "
                        "with published ones (base-class mIoU drops sharply)")
    return warnings


def backbone_name(cfg: CfgNode) -> str:
    """The backbone: cfg.backbone if set, else 'vgg' or 'resnet{layers}' as in the reference."""
    if cfg.backbone:
        return cfg.backbone
    return "vgg" if cfg.vgg else f"resnet{cfg.layers}"


def repo_path(p: str | Path) -> Path:
    """A path from a config, resolved against the repository root unless it is absolute."""
    if str(p) == "":
        raise ConfigError("empty path: the config value is not set")
    path = Path(p).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def config_summary(cfg: CfgNode) -> str:
    """One 'key: value' line per key, sorted, for logs."""
    return "\n".join(f"{key}: {cfg[key]!r}" for key in sorted(cfg))
