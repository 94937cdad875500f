"""Meta-test: the base model and EFTNet side by side over several evaluation seeds.

    python meta_test.py --config config/pascal/pascal_split0_resnet50.yaml [--opts key value ...]
    torchrun --nproc_per_node 2 meta_test.py --config ...      (episodes split across ranks)

Per seed: the episode list, then per episode the zero round (plain base model) and the
EFTNet rounds; one JSON record per finished episode (a killed run resumes from them),
metrics for both, a results JSON, TensorBoard curves and a table.

A run holds its output folder (``run.lock``, util/lock.py): a second run on it refuses. Every
input is checked before anything else is written there (config, checkpoint, data, the episode
lists of all seeds, earlier records there); a user's mistake ends the run with one message and
a non-zero exit (2 for config and usage), the traceback only with ``--debug``; Ctrl-C and
SIGTERM end it with one line (exit 130 / 143), and the same command resumes. Inputs that the
reference accepts but that change what the numbers mean give a WARNING that is printed and
stored in ``results.json`` (``warnings``).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import torch
from tqdm import tqdm

from dataset.demo import ensure_demo_present
from dataset.episodes import Episode, load_episodes, save_episodes
from dataset.fewshot import EpisodeDataset, build_episode_dataset, episode_file_path, episode_loader, to_device
from dataset.splits import base_classes, novel_classes
from evaluation.analysis import (COUNTS_FILE, GroundTruthScores, analyse_pooled, analyse_seed, format_analysis, public,
                                 save_rule_counts, tensorboard_scalars, write_plots)
from evaluation.bootstrap import DEFAULT_LEVEL
from evaluation.records import (RecordFile, RunningMiou, Scores, episode_record, evaluation_seeds, format_table,
                                method_means, per_round_mean)
from evaluation.visualize import episode_panel
from model import build_model
from model.eftnet import EFTNet
from util import distributed
from util.checkpoint import base_weight_path, checkpoint_path, file_sha256, load_configured
from util.config import backbone_name, config_summary, config_warnings, load_config
from util.errors import OutputError, kept_on_interrupt, user_errors
from util.lock import FolderLock
from util.paths import repo_path, write_text_atomic

log = logging.getLogger("meta_test")
QUERY_LABEL_WARNING = ("s2q_query_mask=ground_truth: round selection reads the query's ground-truth label "
                       "(the reference code's behaviour); these EFTNet numbers are not label-free.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--arch", default=None, help="MSANet or BAM (sets cfg.arch)")
    parser.add_argument("--exp-dir", default=None, help="output folder (default: derived from the config)")
    parser.add_argument("--restart", action="store_true",
                        help="discard records and episode lists of an earlier run in exp-dir (once the new "
                             "run's inputs have been checked)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: key value ...")
    return parser.parse_args(argv)


def run_name(cfg) -> str:
    return "base_only" if not cfg.loop_ft else f"s2q_{cfg.s2q_query_mask}"


def output_dir(cfg, given: str | None) -> Path:
    if given:
        return Path(given)
    return repo_path(cfg.exp_root) / cfg.data_set / cfg.arch / f"split{cfg.split}" / backbone_name(cfg) / \
        f"{cfg.shot}shot" / run_name(cfg)


def weight_files(cfg) -> dict[str, Path]:
    """The weight files a run reads, each checked to exist: the checkpoint and, with
    ``base_weight``, the base file its checkpoint leaves the backbone and base learner to."""
    files = {"checkpoint": checkpoint_path(cfg)}
    base = base_weight_path(cfg)
    if base is not None:
        files["base_weight"] = base
    for name, path in files.items():
        if not path.is_file():
            raise FileNotFoundError(f"{name} not found: {path} (weights/README.md says which released files go "
                                    "where; `weight_path` points at any other checkpoint)")
    return files


def fingerprint(cfg, digests: dict[str, str]) -> str:
    """What records may be resumed under: the configuration and the weight files' contents
    (a replaced file at the same path is another model)."""
    return json.dumps({"config": cfg, **digests}, sort_keys=True, default=str)


def _difference(old_text: str, new_text: str) -> str:
    """What differs between two fingerprints, in words."""
    try:
        old, new = json.loads(old_text), json.loads(new_text)
        old_cfg = old["config"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "a configuration snapshot this version cannot compare"
    for key in sorted(k for k in new if k.endswith("_sha256")):
        if old.get(key) != new[key]:
            then = f"{old[key][:12]}..." if old.get(key) else "none"
            return f"another {key.removesuffix('_sha256')} file (sha256 {then} then, {new[key][:12]}... now)"
    keys = sorted(k for k in set(old_cfg) | set(new["config"]) if old_cfg.get(k) != new["config"].get(k))
    shown = ", ".join(f"{k} {old_cfg.get(k)!r} -> {new['config'].get(k)!r}" for k in keys[:5])
    return f"another configuration ({shown}{', ...' if len(keys) > 5 else ''})"


def check_output(out: Path, fingerprint_text: str, restart: bool) -> None:
    """Refuse (reading only) an output folder whose records another run made."""
    if restart or not out.is_dir() or not any(out.glob("records_seed*.jsonl")):
        return
    snapshot = out / "config.json"
    if not snapshot.is_file():
        raise OutputError(f"{out} holds episode records but no config.json saying which run made them; "
                          "pass --restart to discard them or --exp-dir to write elsewhere")
    old = snapshot.read_text()
    if old != fingerprint_text:
        raise OutputError(f"{out} holds records of a run with {_difference(old, fingerprint_text)}; "
                          "pass --restart to discard them or --exp-dir to write elsewhere")


def check_saved_episodes(path: Path, cfg, seed: int, explicit: list[Episode] | None) -> None:
    """An episode list left in the output folder by an earlier run is reused (a resumed run
    keeps its episodes) only if it is the run the config describes: same seed, fold and shot,
    ``test_num`` episodes, and the episodes of ``episode_file`` when that is set."""
    episodes, meta = load_episodes(str(path))
    expected = {"seed": seed, "data_set": cfg.data_set, "split": cfg.split, "shot": cfg.shot}
    problems = [f"{key} {meta.get(key)!r} there, {value!r} in the config" for key, value in expected.items()
                if meta.get(key) != value]
    if len(episodes) != cfg.test_num:
        problems.append(f"{len(episodes)} episodes there, test_num {cfg.test_num} in the config")
    if explicit is not None and explicit != episodes:
        problems.append(f"other episodes than episode_file {episode_file_path(cfg, seed)}")
    if problems:
        raise OutputError(f"{path} was left by an earlier run and disagrees with the config ({'; '.join(problems)}): "
                          "pass --restart to replace it, or --exp-dir to write elsewhere")


def seed_episodes(cfg, out: Path, seed: int, restart: bool) -> tuple[EpisodeDataset, list[Episode], bool]:
    """The dataset and episodes of one seed, checked; and whether the list must be saved."""
    saved = out / f"episodes_seed{seed}.json"
    if saved.is_file() and not restart:  # a resumed run keeps its own episode list
        if episode_file_path(cfg, seed) is not None:  # the config's own list: checked, then compared
            dataset, episodes = build_episode_dataset(cfg, seed)
            check_saved_episodes(saved, cfg, seed, episodes)
        else:
            check_saved_episodes(saved, cfg, seed, None)
            dataset, episodes = build_episode_dataset(type(cfg)(cfg, episode_file=str(saved.resolve())), seed)
        return dataset, episodes, False
    dataset, episodes = build_episode_dataset(cfg, seed)
    return dataset, episodes, True


def record_files(out: Path, seed: int | str = "*") -> list[Path]:
    """The records files of ``seed`` (every seed by default), one per rank, in ``out``."""
    return sorted(out.glob(f"records_seed{seed}_rank*.jsonl"))


def check_records(out: Path, seeds: list[int], episodes: int, with_base: bool) -> None:
    """Read every records file an earlier run left (DataError on damage); say what a kill cut short."""
    for seed in seeds:
        for note in RecordFile.read_all(record_files(out, seed), episodes, with_base)[1]:
            log.warning(note)


def discard_earlier_run(out: Path) -> None:
    """--restart: what described the earlier records goes first (its results, counts, plots and
    curves), then the records, so that no file is ever left describing records that are gone."""
    for path in (out / "results.json", out / "results.txt", out / COUNTS_FILE, *out.glob("plot_*.png")):
        path.unlink(missing_ok=True)
    shutil.rmtree(out / "tensorboard", ignore_errors=True)
    for path in record_files(out):
        path.unlink()


def prepare_output(out: Path, cfg, fingerprint_text: str, restart: bool,
                   plans: dict[int, tuple[EpisodeDataset, list[Episode], bool]], with_base: bool) -> None:
    """Write the run's config snapshot and episode lists into ``out``: with ``restart`` after
    discarding the earlier run, else after ending each records file with a whole record
    (``with_base``: records carry the base learner's counts). Called only once every input has
    been checked."""
    if restart:
        discard_earlier_run(out)
    for path in record_files(out):
        RecordFile.repair(path, cfg.test_num, with_base)
    write_text_atomic(out / "config.json", fingerprint_text)
    for seed, (_, episodes, save) in plans.items():
        if save:
            save_episodes(str(out / f"episodes_seed{seed}.json"), episodes,
                          {"seed": seed, "data_set": cfg.data_set, "split": cfg.split, "shot": cfg.shot})


def early_stop_warnings(per_seed: dict[int, dict]) -> list[str]:
    """A warning when EFTNet's rounds stopped early (a non-finite fine-tuning loss) in any episode."""
    stopped = sum(s["stopped_early"] for s in per_seed.values())
    if not stopped:
        return []
    episodes = sum(s["episodes"] for s in per_seed.values())
    return [f"{stopped} of {episodes} episodes stopped their EFTNet rounds early (a non-finite fine-tuning loss, "
            "e.g. from too large a ft_base_lr): their round was chosen among fewer rounds"]


class Evaluator:
    """Runs the episodes of one configuration on this rank."""

    def __init__(self, cfg, ctx: distributed.Context):
        self.cfg, self.ctx = cfg, ctx
        self.model = build_model(cfg).to(ctx.device).eval()
        novel = novel_classes(cfg.data_set, cfg.split, cfg.use_split_coco)
        info = load_configured(self.model, cfg, novel)
        log.info("loaded %s (%s)", checkpoint_path(cfg), info)
        self.engine = EFTNet(self.model, cfg) if cfg.loop_ft else None
        self.num_novel = len(novel)
        with_base = self.model.predicts_base_classes
        self.num_base = len(base_classes(cfg.data_set, cfg.split, cfg.use_split_coco)) if with_base else 0
        self.writer = None

    def open_output(self, out: Path) -> None:
        """Start writing to ``out`` (its TensorBoard logs on the main rank)."""
        self.out = out
        if self.ctx.main:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def episode(self, batch: dict) -> tuple[object, object, Optional[list[float]]]:
        """The zero round, EFTNet's result (None without fine-tuning) and the rounds'
        ground-truth s2q scores (None if not recorded). In pseudo mode the engine never receives
        the query label: the evaluator holds it and asks the observer probe for the ground-truth
        score of each round."""
        if self.engine is None:
            with torch.no_grad():
                return self.model(batch["query_img"], batch["support_imgs"], batch["support_masks"]), None, None
        ground_truth = self.cfg.s2q_query_mask == "ground_truth"
        observer = GroundTruthScores(batch["query_mask"]) if self.cfg.s2q_gt_scores and not ground_truth else None
        result = self.engine.adapt(batch["query_img"], batch["support_imgs"], batch["support_masks"],
                                   padding=batch["padding"], query_mask=batch["query_mask"] if ground_truth else None,
                                   observer=observer)
        gt_scores = result.round_scores if ground_truth else observer.scores if observer is not None else None
        return result.zero_round, result, gt_scores

    def records(self, seed: int) -> dict[int, dict]:
        """Every rank's records of ``seed`` read so far, by episode index."""
        return RecordFile.read_all(record_files(self.out, seed), self.cfg.test_num, self.model.predicts_base_classes)[0]

    def run_seed(self, seed_index: int, seed: int, dataset: EpisodeDataset) -> Scores:
        cfg, ctx, out = self.cfg, self.ctx, self.out
        done = self.records(seed)
        mine = [i for i in range(len(dataset)) if i % ctx.world == ctx.rank]
        todo = [i for i in mine if i not in done]
        records = RecordFile(out / f"records_seed{seed}_rank{ctx.rank}.jsonl")
        loader = episode_loader(dataset, todo, min(cfg.workers, 4), ctx.device)
        running = RunningMiou(self.num_novel)
        step0 = seed_index * len(dataset)
        bar = tqdm(loader, total=len(todo), desc=f"seed {seed}", disable=not ctx.main, dynamic_ncols=True)
        for index, raw in zip(todo, bar):
            batch = to_device(raw, ctx.device)
            start = time.perf_counter()
            zero, eft, gt_scores = self.episode(batch)
            record = episode_record(index, batch, zero, eft, self.num_base, gt_scores,
                                    label_free=cfg.s2q_query_mask == "pseudo")
            record["seconds"] = time.perf_counter() - start
            records.append(record)
            running.add(record)
            self.log_episode(step0 + index, record, running)
            if seed_index == 0:
                self.save_panels(index, batch, zero, eft)
            bar.set_postfix(running.postfix())
        ctx.barrier()
        scores = Scores(self.num_novel, self.num_base)
        for i, record in sorted(self.records(seed).items()):
            if i % ctx.world == ctx.rank:
                scores.add(record)
        scores.all_reduce()
        return scores

    def log_episode(self, step: int, record: dict, running: RunningMiou) -> None:
        """TensorBoard curves of one episode: its time, the running mIoUs, the chosen round."""
        if self.writer is None:
            return
        self.writer.add_scalar("time/seconds_per_episode", record["seconds"], step)
        for method, miou in running.values().items():
            self.writer.add_scalar(f"running/miou_{method}", miou, step)
        if "rounds" in record and record["rounds"]["chosen"] is not None:
            self.writer.add_scalar("rounds/chosen_round", record["rounds"]["chosen"], step)

    def save_panels(self, index: int, batch: dict, zero, eft) -> None:
        """Episode pictures of the first seed: the first ``tb_images`` in TensorBoard, and every
        one in the ``show`` (base model) and ``show_ft`` (with EFTNet) folders when set."""
        pseudo = None if eft is None else eft.pseudo_mask
        if self.writer is not None and index < self.cfg.tb_images:
            panel = episode_panel(batch, zero.final, None if eft is None else eft.final, pseudo)
            self.writer.add_image(f"episodes/{index:04d}", panel, 0, dataformats="HWC")
        for key, with_eftnet in (("show", False), ("show_ft", True)):
            if not self.cfg[key] or (with_eftnet and eft is None):
                continue
            folder = repo_path(self.cfg[key])
            folder.mkdir(parents=True, exist_ok=True)
            image = episode_panel(batch, zero.final, eft.final if with_eftnet else None, pseudo if with_eftnet else None)
            cv2.imwrite(str(folder / f"episode{index:04d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))

    def log_seed(self, seed_index: int, seed: int, summary: dict, scores: Scores) -> None:
        if self.writer is None:
            return
        for method in ("zero", "eftnet"):
            if method in summary:
                self.writer.add_scalar(f"seed/miou_{method}", summary[method]["miou"], seed_index)
                self.writer.add_scalar(f"seed/fbiou_{method}", summary[method]["fbiou"], seed_index)
        if summary["base_miou"] is not None:
            self.writer.add_scalar("seed/base_miou", summary["base_miou"], seed_index)
        if scores.chosen:
            self.writer.add_histogram("rounds/chosen_round_histogram", np.array(scores.chosen), seed_index)
            for r, value in enumerate(per_round_mean(scores.round_scores), start=1):
                self.writer.add_scalar(f"rounds/s2q_score_seed{seed}", value, r)
            for r, value in enumerate(per_round_mean(scores.round_losses), start=1):
                self.writer.add_scalar(f"rounds/loss_seed{seed}", value, r)


    def analyse_rules(self, seeds: list[int]) -> tuple[dict, str]:
        """Every selection rule on this run's episodes (main rank, after all records are in):
        numbers and paired intervals per seed and pooled over seeds, for results.json, the table,
        TensorBoard and the plots; and the compact per-rule counts the fold summary resamples."""
        cfg, out = self.cfg, self.out
        draws, seed = cfg.bootstrap_draws, cfg.bootstrap_seed
        in_order = {s: [r for _, r in sorted(self.records(s).items())] for s in seeds}
        per_seed = {s: analyse_seed(in_order[s], self.num_novel, cfg.ft_number, draws, seed) for s in seeds}
        pooled = analyse_pooled(per_seed, self.num_novel, cfg.ft_number, draws, seed)
        save_rule_counts(out / COUNTS_FILE, per_seed, self.num_novel)
        images = write_plots(out, per_seed, pooled)
        if self.writer is not None:
            for index, analysis in enumerate(per_seed.values()):
                for tag, value in tensorboard_scalars(analysis, "rules").items():
                    self.writer.add_scalar(tag, value, index)
            for tag, value in tensorboard_scalars(pooled, "rules_pooled").items():
                self.writer.add_scalar(tag, value, 0)
            for name, image in images.items():
                self.writer.add_image(f"plots/{name}", image, 0, dataformats="HWC")
        results = {"rules": {"per_seed": {s: public(a) for s, a in per_seed.items()}, "pooled": public(pooled)},
                   "bootstrap": {"draws": draws, "seed": seed, "level": DEFAULT_LEVEL,
                                 "pooled_over_seeds": "episodes of all seeds as one sample, each seed resampled "
                                                      "within itself"}}
        return results, format_analysis(per_seed, pooled, draws, seed)


def main(argv: list[str] | None = None) -> dict:
    """The command line: results as a dict; a user's mistake exits with one message."""
    args = parse_args(argv)
    with user_errors("meta_test.py", args.debug):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    """Check every input, then evaluate every seed; returns what results.json holds."""
    opts = list(args.opts) + (["arch", args.arch] if args.arch else [])
    cfg = load_config(args.config, opts)
    ctx = distributed.setup(cfg.device)
    logging.basicConfig(level=logging.INFO if ctx.main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    warnings = config_warnings(cfg)
    if cfg.loop_ft and cfg.s2q_query_mask == "ground_truth":
        warnings.append(QUERY_LABEL_WARNING)
    out = output_dir(cfg, args.exp_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--exp-dir {out} is a file, not a folder")
    files = weight_files(cfg)
    digests = {f"{name}_sha256": file_sha256(path) for name, path in files.items()}  # once: they fingerprint the records
    resume = f"the records of finished episodes are kept in {out}; rerun the same command to resume"
    with FolderLock(out) if ctx.main else nullcontext(), kept_on_interrupt(resume):
        return evaluate(args, cfg, ctx, out, files, digests, warnings)


def evaluate(args: argparse.Namespace, cfg, ctx: distributed.Context, out: Path, files: dict[str, Path],
             digests: dict[str, str], warnings: list[str]) -> dict:
    """The run in its output folder, which this process holds: check what is there, then
    evaluate every seed and write the results."""
    fingerprint_text = fingerprint(cfg, digests)
    check_output(out, fingerprint_text, args.restart)
    log.info("config %s\n%s", args.config, config_summary(cfg))
    for warning in warnings:
        log.warning(warning)
    evaluator = Evaluator(cfg, ctx)
    if cfg.data_set == "demo":  # the built-in benchmark is generated on first use
        if ctx.main:
            ensure_demo_present(repo_path(cfg.data_root))
        ctx.barrier()
    seeds = evaluation_seeds(cfg.manual_seed, cfg.num_seeds)
    plans = {seed: seed_episodes(cfg, out, seed, args.restart) for seed in seeds}
    if ctx.main and not args.restart:  # the main rank holds the folder: it reads and reports what is there
        check_records(out, seeds, cfg.test_num, evaluator.model.predicts_base_classes)
    if ctx.main:  # every input is checked: only now is the output folder written
        prepare_output(out, cfg, fingerprint_text, args.restart, plans, evaluator.model.predicts_base_classes)
    ctx.barrier()
    evaluator.open_output(out)
    per_seed: dict[int, dict] = {}
    for seed_index, seed in enumerate(seeds):
        scores = evaluator.run_seed(seed_index, seed, plans[seed][0])
        per_seed[seed] = scores.seed_summary(cfg.loop_ft, cfg.ft_number)
        evaluator.log_seed(seed_index, seed, per_seed[seed], scores)
    if cfg.loop_ft:
        warnings = warnings + early_stop_warnings(per_seed)
    results = {"config": args.config, "exp_dir": str(out), "arch": cfg.arch, "data_set": cfg.data_set,
               "split": cfg.split, "shot": cfg.shot, "backbone": backbone_name(cfg), "loop_ft": cfg.loop_ft,
               "s2q_query_mask": cfg.s2q_query_mask if cfg.loop_ft else None,
               "uses_query_labels": bool(cfg.loop_ft and cfg.s2q_query_mask == "ground_truth"),
               **{name: str(path) for name, path in files.items()}, **digests, "settings": dict(cfg),
               "warnings": warnings, "seeds": per_seed, **method_means(per_seed, cfg.loop_ft)}
    rules_text = None
    if ctx.main and cfg.loop_ft:
        analysis, rules_text = evaluator.analyse_rules(seeds)
        results.update(analysis)
    if ctx.main:
        table = format_table(per_seed, cfg.loop_ft)
        counts = sorted({s["episodes"] for s in per_seed.values()})
        heading = f"{cfg.arch} {backbone_name(cfg)} {cfg.data_set} fold {cfg.split}, {cfg.shot}-shot, " \
                  f"{'/'.join(map(str, counts))} episodes x {len(per_seed)} seeds"
        if cfg.loop_ft:
            heading += f"; EFTNet s2q query mask: {cfg.s2q_query_mask}"
        text = "\n".join([heading, table] + (["", rules_text] if rules_text else [])
                         + [f"WARNING: {w}" for w in warnings])
        print(text)
        write_text_atomic(out / "results.txt", text + "\n")
        write_text_atomic(out / "results.json", json.dumps(results, indent=1, default=float))
        evaluator.writer.close()
    distributed.cleanup()
    return results


if __name__ == "__main__":
    main()
