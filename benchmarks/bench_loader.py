"""meta_test's data path against the engine alone: episodes per second on a demo fold.

    python -m benchmarks.bench_loader [--episodes 16] [--workers 0 1 2] [--threads 1 2] [--busy]

For each thread count: the engine alone on episodes already in memory, then meta_test's loop
(its DataLoader, then the engine) for each worker count, in episodes per second, and their ratio
(1.00: the loader never keeps the engine waiting). ``--busy`` keeps one core busy with another
process meanwhile, as on a shared machine: that is where too many threads hurt most.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from model import build_model
from model.eftnet import EFTNet
from util.checkpoint import checkpoint_path, load_weights
from util.config import load_config
from util.paths import repo_path
from dataset.fewshot import build_episode_dataset, episode_loader
from dataset.demo import ensure_demo_present


def episodes_per_second(engine: EFTNet, batches, count: int) -> float:
    start = time.perf_counter()
    for batch in batches:
        batch = {k: v.unsqueeze(0) if torch.is_tensor(v) else v for k, v in batch.items()}
        engine.adapt(batch["query_img"], batch["support_imgs"], batch["support_masks"], padding=batch["padding"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/demo/demo_split0_mobilenetv2.yaml")
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--busy", action="store_true", help="keep one core busy with another process")
    args = parser.parse_args()
    cfg = load_config(args.config, ["device", "cpu"])
    if cfg.data_set == "demo":
        ensure_demo_present(repo_path(cfg.data_root))
    model = build_model(cfg).eval()
    load_weights(model, checkpoint_path(cfg))
    engine = EFTNet(model, cfg)
    dataset, _ = build_episode_dataset(cfg, cfg.manual_seed)
    indices = list(range(min(args.episodes, len(dataset))))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        print(f"{args.config}, {len(indices)} episodes, {'one core busy' if busy else 'idle machine'}")
        print(f"{'threads':>7} {'workers':>7} {'loop ep/s':>9} {'engine ep/s':>11} {'ratio':>6}")
        for threads in args.threads:
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
            in_memory = [dataset[i] for i in indices]
            episodes_per_second(engine, in_memory[:1], 1)   # warm-up
            alone = episodes_per_second(engine, in_memory, len(indices))
            for workers in args.workers:
                loader = episode_loader(dataset, indices, workers, torch.device("cpu"))
                loop = episodes_per_second(engine, loader, len(indices))
                print(f"{threads:>7} {workers:>7} {loop:9.2f} {alone:11.2f} {loop / alone:6.2f}", flush=True)
    finally:
        if busy is not None:
            busy.kill()


if __name__ == "__main__":
    main()
