"""Meta-test: the base model and EFTNet side by side over several evaluation seeds.

    python meta_test.py --config config/pascal/pascal_split0_resnet50.yaml [--opts key value ...]
    torchrun --nproc_per_node 2 meta_test.py --config ...      (episodes split across ranks)

Per seed: the episode list, then per episode the zero round (plain base model) and the
EFTNet rounds; one JSON record per finished episode (a killed run resumes from them),
metrics for both, a results JSON, TensorBoard curves and a table.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from model import build_model
from model.eftnet import EFTNet
from util import distributed
from util.checkpoint import checkpoint_path, load_weights
from util.config import backbone_name, config_summary, load_config, repo_path
from util.dataset import build_episode_dataset
from util.demo_data import ensure_demo
from util.episodes import save_episodes
from util.evaluation import RecordFile, Scores, episode_record, evaluation_seeds, format_table, record_counts
from util.metrics import FewShotMeter
from util.splits import base_classes, novel_classes
from util.visualize import episode_panel

log = logging.getLogger("meta_test")
QUERY_LABEL_WARNING = ("s2q_query_mask=ground_truth: round selection reads the query's ground-truth label "
                       "(the reference code's behaviour); these EFTNet numbers are not label-free.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--arch", default=None, help="MSANet or BAM (sets cfg.arch)")
    parser.add_argument("--exp-dir", default=None, help="output folder (default: derived from the config)")
    parser.add_argument("--restart", action="store_true", help="discard records of an earlier run in exp-dir")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: key value ...")
    return parser.parse_args(argv)


def run_name(cfg) -> str:
    return "base_only" if not cfg.loop_ft else f"s2q_{cfg.s2q_query_mask}"


def output_dir(cfg, given: str | None) -> Path:
    if given:
        return Path(given)
    return repo_path(cfg.exp_root) / cfg.data_set / cfg.arch / f"split{cfg.split}" / backbone_name(cfg) / \
        f"{cfg.shot}shot" / run_name(cfg)


def prepare_output(out: Path, cfg, restart: bool) -> None:
    """Create ``out``; refuse to resume records made with a different configuration."""
    out.mkdir(parents=True, exist_ok=True)
    snapshot, fingerprint = out / "config.json", json.dumps(cfg, sort_keys=True, default=str)
    if restart:
        for path in out.glob("records_seed*.jsonl"):
            path.unlink()
    elif snapshot.exists() and any(out.glob("records_seed*.jsonl")) and snapshot.read_text() != fingerprint:
        raise SystemExit(f"{out} holds records of a run with another configuration; "
                         "pass --restart to discard them or --exp-dir to write elsewhere")
    snapshot.write_text(fingerprint)


def to_device(batch: dict, device: torch.device) -> dict:
    """Add the batch axis (episodes come one at a time) and move tensors to ``device``."""
    return {k: v.unsqueeze(0).to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


class Evaluator:
    """Runs the episodes of one configuration on this rank."""

    def __init__(self, cfg, ctx: distributed.Context, out: Path):
        self.cfg, self.ctx, self.out = cfg, ctx, out
        self.model = build_model(cfg).to(ctx.device).eval()
        path = checkpoint_path(cfg)
        info = load_weights(self.model, path)
        log.info("loaded %s (%s)", path, info)
        self.engine = EFTNet(self.model, cfg) if cfg.loop_ft else None
        self.num_novel = len(novel_classes(cfg.data_set, cfg.split, cfg.use_split_coco))
        self.num_base = len(base_classes(cfg.data_set, cfg.split, cfg.use_split_coco))
        self.writer = None
        if ctx.main:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def episode(self, batch: dict) -> tuple[dict, object, object]:
        if self.engine is None:
            with torch.no_grad():
                return batch, self.model(batch["query_img"], batch["support_imgs"], batch["support_masks"]), None
        query_mask = batch["query_mask"] if self.cfg.s2q_query_mask == "ground_truth" else None
        result = self.engine.adapt(batch["query_img"], batch["support_imgs"], batch["support_masks"],
                                   padding=batch["padding"], query_mask=query_mask)
        return batch, result.zero_round, result

    def run_seed(self, seed_index: int, seed: int) -> Scores:
        cfg, ctx, out = self.cfg, self.ctx, self.out
        episode_file = out / f"episodes_seed{seed}.json"
        seed_cfg = type(cfg)(cfg)
        if episode_file.exists():  # a resumed run keeps its own episode list
            seed_cfg.episode_file = str(episode_file.resolve())
        dataset, episodes = build_episode_dataset(seed_cfg, seed)
        if ctx.main and not episode_file.exists():
            save_episodes(str(episode_file), episodes, {"seed": seed, "data_set": cfg.data_set,
                                                        "split": cfg.split, "shot": cfg.shot})
        ctx.barrier()
        record_paths = sorted(out.glob(f"records_seed{seed}_rank*.jsonl"))
        done = RecordFile.read_all(record_paths)
        mine = [i for i in range(len(dataset)) if i % ctx.world == ctx.rank]
        todo = [i for i in mine if i not in done]
        records = RecordFile(out / f"records_seed{seed}_rank{ctx.rank}.jsonl")
        loader = DataLoader(Subset(dataset, todo), batch_size=None, shuffle=False,
                            num_workers=min(cfg.workers, 4))
        running = {"zero": FewShotMeter(self.num_novel), "eftnet": FewShotMeter(self.num_novel)}
        step0 = seed_index * len(dataset)
        bar = tqdm(loader, total=len(todo), desc=f"seed {seed}", disable=not ctx.main, dynamic_ncols=True)
        for index, raw in zip(todo, bar):
            start = time.perf_counter()
            batch, zero, eft = self.episode(to_device(raw, ctx.device))
            seconds = time.perf_counter() - start
            record = episode_record(index, batch, zero, eft, self.num_base)
            record["seconds"] = seconds
            records.append(record)
            self.log_episode(step0 + index, seed_index, index, record, running, batch, zero, eft)
            bar.set_postfix({k: f"{100 * m.class_miou():.1f}" for k, m in running.items() if k in record})
        ctx.barrier()
        scores = Scores(self.num_novel, self.num_base)
        for i, record in sorted(RecordFile.read_all(sorted(out.glob(f"records_seed{seed}_rank*.jsonl"))).items()):
            if i % ctx.world == ctx.rank:
                scores.add(record)
        scores.all_reduce()
        return scores

    def log_episode(self, step, seed_index, index, record, running, batch, zero, eft) -> None:
        for method, meter in running.items():
            if method in record:
                meter.add(record["class_idx"], *record_counts(record[method]["final"]))
        if self.writer is None:
            return
        self.writer.add_scalar("time/seconds_per_episode", record["seconds"], step)
        for method, meter in running.items():
            if method in record:
                self.writer.add_scalar(f"running/miou_{method}", meter.class_miou(), step)
        if "rounds" in record:
            self.writer.add_scalar("rounds/chosen_round", record["rounds"]["chosen"], step)
        panel = None
        if seed_index == 0 and index < self.cfg.tb_images:
            panel = episode_panel(batch, zero.final, None if eft is None else eft.final,
                                  None if eft is None else eft.pseudo_mask)
            self.writer.add_image(f"episodes/{index:04d}", panel, 0, dataformats="HWC")
        for key, prediction in (("show", zero.final), ("show_ft", None if eft is None else eft.final)):
            if self.cfg[key] and prediction is not None and seed_index == 0:
                folder = repo_path(self.cfg[key])
                folder.mkdir(parents=True, exist_ok=True)
                image = episode_panel(batch, zero.final, None if key == "show" else prediction,
                                      None if eft is None or key == "show" else eft.pseudo_mask)
                cv2.imwrite(str(folder / f"episode{index:04d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))

    def log_seed(self, seed_index: int, seed: int, summary: dict, scores: Scores) -> None:
        if self.writer is None:
            return
        for method in ("zero", "eftnet"):
            if method in summary:
                self.writer.add_scalar(f"seed/miou_{method}", summary[method]["miou"], seed_index)
                self.writer.add_scalar(f"seed/fbiou_{method}", summary[method]["fbiou"], seed_index)
        self.writer.add_scalar("seed/base_miou", summary["base_miou"], seed_index)
        if scores.chosen:
            self.writer.add_histogram("rounds/chosen_round_histogram", np.array(scores.chosen), seed_index)
            for r, value in enumerate(np.mean(scores.round_scores, 0), start=1):
                self.writer.add_scalar(f"rounds/s2q_score_seed{seed}", value, r)
            losses = [l for l in scores.round_losses if len(l) == len(scores.round_losses[0])]
            for r, value in enumerate(np.mean(losses, 0) if losses else [], start=1):
                self.writer.add_scalar(f"rounds/loss_seed{seed}", value, r)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    opts = list(args.opts) + (["arch", args.arch] if args.arch else [])
    cfg = load_config(args.config, opts)
    ctx = distributed.setup(cfg.device)
    logging.basicConfig(level=logging.INFO if ctx.main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    out = output_dir(cfg, args.exp_dir)
    if ctx.main:
        prepare_output(out, cfg, args.restart)
    ctx.barrier()
    log.info("config %s\n%s", args.config, config_summary(cfg))
    if cfg.loop_ft and cfg.s2q_query_mask == "ground_truth":
        log.warning(QUERY_LABEL_WARNING)
    if cfg.data_set == "demo":  # the built-in benchmark is generated on first use
        if ctx.main:
            ensure_demo(repo_path(cfg.data_root))
        ctx.barrier()
    evaluator = Evaluator(cfg, ctx, out)
    per_seed: dict[int, dict] = {}
    for seed_index, seed in enumerate(evaluation_seeds(cfg.manual_seed, cfg.num_seeds)):
        scores = evaluator.run_seed(seed_index, seed)
        per_seed[seed] = scores.summary(cfg.loop_ft)
        per_seed[seed]["mean_round_scores"] = np.mean(scores.round_scores, 0).tolist() if scores.chosen else []
        per_seed[seed]["chosen_rounds"] = np.bincount(scores.chosen, minlength=cfg.ft_number + 1)[1:].tolist() \
            if scores.chosen else []
        evaluator.log_seed(seed_index, seed, per_seed[seed], scores)
    results = {"config": args.config, "exp_dir": str(out), "arch": cfg.arch, "data_set": cfg.data_set,
               "split": cfg.split, "shot": cfg.shot, "backbone": backbone_name(cfg), "loop_ft": cfg.loop_ft,
               "s2q_query_mask": cfg.s2q_query_mask if cfg.loop_ft else None,
               "uses_query_labels": bool(cfg.loop_ft and cfg.s2q_query_mask == "ground_truth"),
               "seeds": per_seed}
    for method in ("zero", "eftnet") if cfg.loop_ft else ("zero",):
        values = np.array([[s[method]["miou"], s[method]["fbiou"]] for s in per_seed.values()])
        results[method] = {"miou_mean": values[:, 0].mean(), "fbiou_mean": values[:, 1].mean(),
                           "miou_best": values[:, 0].max(), "fbiou_best": values[:, 1].max()}
    if ctx.main:
        table = format_table(per_seed, cfg.loop_ft)
        heading = f"{cfg.arch} {backbone_name(cfg)} {cfg.data_set} fold {cfg.split}, {cfg.shot}-shot, " \
                  f"{cfg.test_num} episodes x {len(per_seed)} seeds"
        if cfg.loop_ft:
            heading += f"; EFTNet s2q query mask: {cfg.s2q_query_mask}"
        text = heading + "\n" + table + ("\n" + QUERY_LABEL_WARNING if results["uses_query_labels"] else "")
        print(text)
        (out / "results.txt").write_text(text + "\n")
        (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
        evaluator.writer.close()
    distributed.cleanup()
    return results


if __name__ == "__main__":
    main()
