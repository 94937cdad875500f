"""Load and check EFTNet configuration files.

A config file is YAML with sections (Data, Train, Method, Test_Finetune, ...). As in the
reference code the sections are flattened into one namespace, so a key may appear in only one
section. Every key must be declared in SCHEMA, whose default value also fixes the key's type;
values from the file and from ``--opts`` are checked against it, and missing keys take the
default.

Checkpoint rule: after the opts are applied, unless ``weight`` was given in the opts, the file
of the configured arch and shot is picked when the config names one. One rule for every arch:
``weight_{arch}`` names its 1-shot file and ``weight_{arch}_5shot`` its file for ``shot > 1``
(arch in lower case; MSANet, the reference's model, keeps the reference's ``weight`` and
``weight_5shot``); without a many-shot file the arch's 1-shot file is taken (HSNet's K-shot
prediction is a vote of its 1-shot model), and without that the ``weight`` key. So ``--opts
shot 5`` picks the fold's released 5-shot checkpoint and ``--arch BAM`` a BAM file, while an
explicit ``--opts weight X`` always wins.
"""
from __future__ import annotations

import copy
import difflib
import math
import re
from pathlib import Path
from typing import Any

import yaml

from util.errors import ConfigError, ConfigFileNotFound

# Every known key with its default; the default's type is the key's type.
SCHEMA: dict[str, Any] = {
    # Data
    "data_root": "", "val_list": "",
    # train.py stage 1: the base learner's list, every train image with novel classes as
    # background (BAM's train_base.py: voc_sbd_merge_noduplicate.txt); '' = no stage 1 possible
    "train_list": "",
    # Train (train_h/w, batch_size, base_lr, epochs, power, fix_bn: train.py's meta-training)
    "train_h": 473, "train_w": 473, "val_size": 473,
    "split": 0, "shot": 1, "data_set": "pascal", "use_split_coco": False,
    "batch_size": 8, "base_lr": 0.005, "epochs": 200,
    "power": 0.9, "momentum": 0.9, "weight_decay": 0.0001,
    "workers": 8, "fix_bn": True, "manual_seed": 123,
    "zoom_factor": 8,
    # Method
    "layers": 50, "vgg": False, "aux_weight1": 1.0, "sr_aux_weight1": 1.0, "kshot_trans_dim": 2,
    # Test_Finetune
    "weight": "", "loop_ft": True, "show": "", "show_ft": "",
    "ft_base_lr": 0.005, "ft_power": 0.9, "ft_number": 5,
    "change_weighting": [0.8, 0.2], "q2s_filt_para": 0.2,
    # Project keys (not in the reference configs)
    "arch": "MSANet",
    "backbone": "",  # '' = derive from layers/vgg (see backbone_name)
    "reduce_dim": 256,
    "base_width": 512,  # hidden width of the base learner's classifier (512 in every release)
    "s2q_query_mask": "pseudo",  # 'ground_truth' reproduces the reference (reads the query label)
    "round_selection": "s2q",  # EFTNet's answer: model/round_selection.py (s2q: the paper's rule)
    "q2s_blend": True,  # ablation: False = the q2s prediction uses the real supports only
    # evaluation: also record each round's s2q score with the query label (the reference's selection;
    # never seen by the engine); costs +11 % per episode at 201 px 1-shot, +16 % at 473 px, +42 % at 473 px 5-shot
    "s2q_gt_scores": False,
    "bootstrap_draws": 2000,  # paired bootstrap draws of the selection-rule intervals
    "bootstrap_seed": 2024,  # its fixed seed
    # EFTNet: memory for similarity products kept across an episode's rounds (MSANet's columns,
    # HSNet's K x K support table); past it they are recomputed when read (0 = none kept)
    "similarity_cache_mb": 1024,
    "kshot_order_quirk": True,  # reproduce MSANet's k-shot reweighting order bug
    "vgg_l2_last_shot_quirk": True,  # reproduce MSANet's VGG l2 correlation of the last shot
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "test_num": 1000,  # episodes per seed
    "num_seeds": 6,
    "weight_5shot": "",  # 5-shot checkpoint file name of this fold/backbone
    "weight_bam": "", "weight_bam_5shot": "",  # BAM checkpoint file names (--arch BAM), 1- and 5-shot
    "weight_hsnet": "", "weight_hsnet_5shot": "",  # HSNet checkpoint file names (--arch HSNet)
    "hsnet_widths": [16, 64, 128],  # HSNet learner widths (16, 64, 128 in the released models)
    # HSNet: memory for one pass of the learner; the (query, shot) pairs go through in groups that
    # fit (EFTNet's s2q decodes K x K of them; 0 = all at once)
    "hsnet_pass_mb": 1024,
    # evaluation geometry: pad (BAM/MSANet: long side to val_size, padded square canvas, metrics
    # at the label's resolution) or squash (HSNet: val_size x val_size, metrics at that size)
    "geometry": "pad",
    # HSNet's list file of the fold ({split} = the fold): its episodes, drawn as its test does
    # (seed 0; one seed); '' = the episodes of the BAM/MSANet protocol
    "hsnet_list": "",
    # A base file (PSPNet layout: backbone and base learner) shared by a fold's checkpoints, which
    # then hold the meta learner only (the demo models); '' = the checkpoint holds everything.
    "base_weight": "",
    "base_weight_hsnet": "",  # HSNet's: its frozen backbone, shared by a fold's HSNet checkpoints
    "weight_path": "",  # explicit checkpoint path; overrides weights_root/...
    "weights_root": "weights", "lists_root": "lists", "episode_file": "", "exp_root": "exp",
    "tb_images": 4,  # episodes whose images are logged to TensorBoard
    # train.py (stage 2, meta-training, reads the reference keys epochs, batch_size, base_lr,
    # power, momentum, weight_decay, aux_weight1, fix_bn; these add stage 1 and the set-up)
    "init_backbone": "imagenet",  # frozen backbone weights: 'imagenet' or 'none' (random; tests only)
    "base_learner_epochs": 6,  # stage 1: epochs of base-learner (PPM + classifier) training
    "base_learner_lr": 0.05,  # stage 1: SGD learning rate (poly decay, batch_size images per step)
    # stage 1: learning rate of the backbone's layer4, trained with the base learner as a PSPNet's
    # backbone is (0: layer4 keeps its initial weights)
    "base_learner_layer4_lr": 0.0,
    # stage 2, BAM: memory for the layer4 maps of every support (image, class), masked by the
    # class, computed once instead of at every step (the same numbers; 0 = at every step)
    "support_cache_mb": 2048,
    "val_episodes": 100,  # novel-class episodes of the quick validation after training (0 = none)
}

# Keys of the reference's config files that this code does not read, reported once as ignored.
# Each maps to the one value that agrees with what this code always does (any other value is
# refused: it would change the numbers), or to ANY for knobs of the reference's own training
# loop and logging, which have no counterpart here.
ANY = object()
NOT_READ: dict[str, Any] = {
    "base_data_root": ANY, "scale_min": ANY, "scale_max": ANY, "rotate_min": ANY,
    "rotate_max": ANY, "start_epoch": ANY, "stop_interval": ANY, "index_split": ANY, "warmup": ANY,
    "print_freq": ANY, "save_freq": ANY, "resume": ANY, "evaluate": ANY, "SubEpoch_val": ANY,
    "seed_deterministic": ANY, "aux_weight2": ANY, "sr_aux_weight2": ANY, "memo_weight": ANY, "merge": ANY,
    "merge_tau": ANY,
    "classes": 2,                  # foreground / background
    "ignore_label": 255,           # void and padding are 255 in every mask
    "padding_label": 255,
    "ann_type": "mask",            # supports are labelled by their masks ('bbox' boxes are not implemented)
    "batch_size_val": 1,           # one episode at a time
    "resized_val": True,           # the Resize-and-pad geometry (the reference's other path is broken)
    "ori_resize": True,            # metrics at the original label resolution
    "fix_random_seed_val": True,   # episodes drawn from the evaluation seeds
    "low_fea": "layer2",           # MSANet's low-level features are layer2's in the reference too
}

# Base classes of every fold (the base learner's outputs, background aside): as in the reference,
# the data set alone sets the count (15 of PASCAL's and the demo's 20 classes, 60 of COCO's 80);
# dataset/splits.py says which classes they are.
BASE_CLASS_COUNT = {"pascal": 15, "coco": 60, "demo": 15}

CHOICES: dict[str, tuple] = {
    "arch": ("MSANet", "BAM", "HSNet"),
    "geometry": ("pad", "squash"),
    "s2q_query_mask": ("pseudo", "ground_truth"),
    "round_selection": ("s2q", "s2q_stop", "soft_vote", "s2q_vote", "stop_vote"),  # model.round_selection.RULES
    "data_set": tuple(BASE_CLASS_COUNT),
    "layers": (50, 101),
    "init_backbone": ("imagenet", "none"),
}

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# The smallest canvas: 5x5 feature maps at output stride 8, and images up to 4:1 keep a short
# side of at least 8 pixels after the resize (below that the geometry has no pixels left).
MIN_VAL_SIZE = 33
MAX_TEST_NUM = 100_000  # episodes per seed: 100 times the published protocols' 1,000
LEARNING_RATES = ("base_lr", "ft_base_lr", "base_learner_lr", "base_learner_layer4_lr")
NON_NEGATIVE = ("workers", "manual_seed", "weight_decay", "momentum", "power", "ft_power",
                "sr_aux_weight1", "aux_weight1", "support_cache_mb", "hsnet_pass_mb")


class CfgNode(dict):
    """A flat dict whose keys are also attributes: ``cfg.shot is cfg["shot"]``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key '{name}'") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def model_arguments(self) -> dict[str, Any]:
        """The configured model as ``model.create_model`` keywords (see ``model_arguments``)."""
        return model_arguments(self)


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
    numbers = value if isinstance(value, list) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
        raise ConfigError(f"{where}: key '{key}' has value {value!r}: expected finite numbers (no nan or inf)")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{where}: key '{key}' must be one of {CHOICES[key]}, got {value!r}")
    return value


def _checked(key: Any, value: Any, where: str) -> Any:
    """A known key's value in its schema type; a key this code does not read only if its value
    agrees with what the code does."""
    if key in SCHEMA:
        return _coerce(key, value, where)
    if key not in NOT_READ:
        raise _unknown_key(key, where)
    required = NOT_READ[key]
    if required is not ANY and not (value == required and type(value) is type(required)):
        raise ConfigError(f"{where}: key '{key}' is {value!r}, but this code always works as with "
                          f"{key}: {required!r} (the reference configs' value); remove the key or set it to {required!r}")
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last
    value without a word, so the earlier line would be silently ignored)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str) and key in seen:
                raise ConfigError(f"{key_node.start_mark.name}, line {line}: key '{key}' is given twice in one "
                                  f"section (also on line {seen[key]}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def _read_sections(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigFileNotFound(f"config file not found: {path}")
    try:
        with path.open() as f:
            doc = yaml.load(f, Loader=_UniqueKeyLoader)
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
            if key in section_of:
                raise ConfigError(f"{path}: key '{key}' appears in both section "
                                  f"'{section_of[key]}' and section '{section}'")
            section_of[key] = section
            values[key] = _checked(key, value, where)
    return values


def _parse_opts(opts: list, source: str) -> dict[str, Any]:
    if len(opts) % 2:
        raise ConfigError(f"{source} needs 'key value' pairs, got an odd number of items: {opts}")
    overrides: dict[str, Any] = {}
    for key, raw in zip(opts[::2], opts[1::2]):
        if key not in SCHEMA and key not in NOT_READ:
            raise _unknown_key(key, source)
        value = raw
        if isinstance(raw, str):
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw
            if isinstance(SCHEMA.get(key), str) and value is not None and not isinstance(value, str):
                value = raw  # a file name such as '2024' stays text
        overrides[key] = _checked(key, value, source)
    return overrides


def _validate(cfg: CfgNode, where: str) -> None:
    cw = cfg.change_weighting
    checks = [
        (cfg.shot >= 1, f"shot must be >= 1, got {cfg.shot}"),
        (cfg.val_size > 0, f"val_size must be a positive int, got {cfg.val_size}"),
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
        (cfg.round_selection == "s2q" or cfg.s2q_query_mask == "pseudo",
         f"round_selection {cfg.round_selection!r} needs s2q_query_mask pseudo: with the query's ground truth "
         "the reference's rule is s2q"),
        (cfg.test_num >= 1, f"test_num must be >= 1, got {cfg.test_num}"),
        (cfg.test_num <= MAX_TEST_NUM,
         f"test_num must be <= {MAX_TEST_NUM} (the published protocols use 1,000 episodes per seed; the whole "
         f"episode list is drawn, checked and saved before the first episode runs), got {cfg.test_num}"),
        (not cfg.episode_file or "{seed}" in cfg.episode_file or cfg.num_seeds == 1,
         f"episode_file {cfg.episode_file!r} has no {{seed}} in its name but num_seeds is {cfg.num_seeds}: every "
         "seed would run the same episodes and be averaged as if independent; name one file per seed with "
         "{seed} (e.g. episodes_seed{seed}.json) or set num_seeds 1"),
        (cfg.num_seeds >= 1, f"num_seeds must be >= 1, got {cfg.num_seeds}"),
        (not cfg.hsnet_list or cfg.num_seeds == 1,
         f"hsnet_list gives HSNet's episodes, which are drawn with its one seed (0), but num_seeds is "
         f"{cfg.num_seeds}: every seed would run the same episodes; set num_seeds 1"),
        (not (cfg.hsnet_list and cfg.episode_file), "hsnet_list and episode_file both give the episodes: set one"),
        (len(cfg.hsnet_widths) == 3 and all(isinstance(w, int) and w >= 4 and w % 4 == 0 for w in cfg.hsnet_widths),
         f"hsnet_widths must be three multiples of 4 (GroupNorm's 4 groups), got {cfg.hsnet_widths!r}"),
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


def load_config(path: str | Path, opts: list[str] | None = None, source: str = "--opts") -> CfgNode:
    """Read a sectioned YAML config, apply ``--opts`` overrides and check every value.

    `opts` is a flat list ``[key, value, key, value, ...]``; each value is parsed with
    ``yaml.safe_load`` ('5' -> 5, 'True' -> True, '[0.8,0.2]' -> list). Unknown keys, values of
    the wrong type or not finite, a key given twice, and invalid values raise ConfigError (a
    ValueError) naming the file or ``source`` (where the overrides came from); a missing file
    raises FileNotFoundError. See the module docstring for the 5-shot rule.
    """
    path = Path(path)
    cfg = CfgNode(copy.deepcopy(SCHEMA))
    given = _read_sections(path)
    overrides = _parse_opts(list(opts or []), source)
    ignored = sorted({key for key in (*given, *overrides) if key in NOT_READ})
    cfg.update({k: v for k, v in given.items() if k in SCHEMA})
    cfg.update({k: v for k, v in overrides.items() if k in SCHEMA})
    object.__setattr__(cfg, "ignored_keys", ignored)  # beside the keys: not part of the configuration
    if "weight" not in overrides:
        cfg.weight = configured_weight(cfg)
    _validate(cfg, f"config {path}" + (f" with {source}" if overrides else ""))
    return cfg


def weight_key(arch: str, shot: int) -> str:
    """The config key naming ``arch``'s checkpoint for ``shot`` supports (the module docstring's rule)."""
    one_shot = "weight" if arch == "MSANet" else f"weight_{arch.lower()}"
    return one_shot + ("_5shot" if shot > 1 else "")


def base_key(arch: str) -> str:
    """The config key naming ``arch``'s base file: ``base_weight_{arch}`` where the schema has
    one (a file of its own layout), else ``base_weight`` (MSANet and BAM share a PSPNet base)."""
    own = f"base_weight_{arch.lower()}"
    return own if own in SCHEMA else "base_weight"


def configured_weight(cfg: CfgNode) -> str:
    """The checkpoint file name of the config's arch and shot (the module docstring's rule)."""
    return cfg[weight_key(cfg.arch, cfg.shot)] or cfg[weight_key(cfg.arch, 1)] or cfg.weight


def config_warnings(cfg: CfgNode) -> list[str]:
    """Values the reference accepts but that change what the numbers mean; a run prints each
    loudly and stores it in its results."""
    warnings = []
    if cfg.geometry == "pad" and (cfg.val_size - 1) % 8:
        warnings.append(f"val_size {cfg.val_size} is not 8k+1 (473 for PASCAL, 641 for COCO): with zoom_factor 8 "
                        "the output maps are not aligned with the input grid and the numbers are not comparable "
                        "with published ones (base-class mIoU drops sharply)")
    return warnings


def backbone_name(cfg: CfgNode) -> str:
    """The backbone: cfg.backbone if set, else 'vgg' or 'resnet{layers}' as in the reference."""
    if cfg.backbone:
        return cfg.backbone
    return "vgg" if cfg.vgg else f"resnet{cfg.layers}"


def model_arguments(cfg: CfgNode) -> dict[str, Any]:
    """The one mapping from a config to a model: arch, backbone, shot, the fold's number of base
    classes (the base learner's outputs), widths and the reference quirks of MSANet."""
    if cfg.arch == "HSNet":
        return dict(arch=cfg.arch, backbone=backbone_name(cfg), shot=cfg.shot, widths=tuple(cfg.hsnet_widths),
                    pass_mb=cfg.hsnet_pass_mb)
    arguments = dict(arch=cfg.arch, backbone=backbone_name(cfg), shot=cfg.shot,
                     num_base_classes=BASE_CLASS_COUNT[cfg.data_set],
                     reduce_dim=cfg.reduce_dim, base_width=cfg.base_width, kshot_trans_dim=cfg.kshot_trans_dim,
                     zoom_factor=cfg.zoom_factor)
    if cfg.arch == "MSANet":
        arguments.update(kshot_order_quirk=cfg.kshot_order_quirk, vgg_l2_last_shot_quirk=cfg.vgg_l2_last_shot_quirk)
    return arguments


def config_summary(cfg: CfgNode) -> str:
    """One 'key: value' line per key, sorted, for logs; then the keys of the file and ``--opts``
    that this code does not read (``NOT_READ``)."""
    lines = [f"{key}: {cfg[key]!r}" for key in sorted(cfg)]
    ignored = getattr(cfg, "ignored_keys", [])
    if ignored:
        lines.append(f"ignored (reference keys this code does not read): {', '.join(ignored)}")
    return "\n".join(lines)
