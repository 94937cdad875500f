"""Time of the paired bootstrap for a full reference-size run: 6 seeds x 1,000 episodes, 20 classes.

    python -m benchmarks.bench_bootstrap [--episodes 6000] [--classes 20] [--draws 2000] [--seeds 6]

Prints seconds for one comparison on all episodes as one sample, and pooled over seeds
(each seed resampled within itself). The target is under 5 s for 6,000 episodes.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from evaluation.bootstrap import EpisodeCounts, paired_bootstrap, pooled_over_seeds


def random_counts(rng: np.random.Generator, class_idx: np.ndarray, classes: int) -> EpisodeCounts:
    episodes = class_idx.shape[0]
    target = rng.integers(2_000, 60_000, episodes)
    hits = (target * rng.uniform(0.2, 0.95, episodes)).astype(np.int64)
    false_pos = rng.integers(0, 20_000, episodes)
    canvas = 250_000
    return EpisodeCounts(class_idx, np.stack([canvas - target - false_pos, hits], 1),
                         np.stack([canvas - hits, target + false_pos], 1), classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=6000)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=6)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    class_idx = rng.integers(0, args.classes, args.episodes)
    a, z = random_counts(rng, class_idx, args.classes), random_counts(rng, class_idx, args.classes)
    start = time.perf_counter()
    result = paired_bootstrap(a, z, draws=args.draws)
    one = time.perf_counter() - start
    per_seed = np.array_split(np.arange(args.episodes), args.seeds)
    pairs = [tuple(EpisodeCounts(c.class_idx[i], c.inter[i], c.union[i], c.num_classes) for c in (a, z))
             for i in per_seed]
    start = time.perf_counter()
    pooled_over_seeds(pairs, draws=args.draws)
    pooled = time.perf_counter() - start
    print(f"{args.episodes} episodes, {args.classes} classes, {args.draws} draws: one sample {one:.2f} s, "
          f"pooled over {args.seeds} seeds {pooled:.2f} s (dmIoU {100 * result.miou.point:+.2f} "
          f"[{100 * result.miou.low:+.2f}, {100 * result.miou.high:+.2f}])")


if __name__ == "__main__":
    main()
