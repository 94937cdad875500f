"""Base-model forward time and peak memory (random weights), against the backbone alone.

    python benchmarks/bench_base_model.py [--size 473] [--shots 1 5] [--backbone resnet50] [--arch MSANet]

The baseline, run in the same process, is the frozen backbone on the query and the K
supports: work no implementation can skip. The ratio shows what support guidance, the
meta learner and the base learner add on top of it.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import peak_memory_mb, random_episode, reset_peak, timed
from model import BAM, MSANet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=473)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--arch", default="MSANet", choices=["MSANet", "BAM"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device {device}, {args.arch} {args.backbone}, {args.size} px, threads {torch.get_num_threads()}")
    print(f"{'shot':>4} {'backbone s':>10} {'forward s':>10} {'ratio':>6} {'peak MB':>8}")
    for shot in args.shots:
        model = (MSANet if args.arch == "MSANet" else BAM)(args.backbone, shot, 15).to(device).eval()
        ep = random_episode(args.size, shot, device)
        images = torch.cat([ep["query_img"], ep["support_imgs"][0]])

        def backbone() -> None:
            model.extract(images)

        def forward() -> None:
            with torch.no_grad():
                model(ep["query_img"], ep["support_imgs"], ep["support_masks"])

        backbone_s = timed(backbone, device, args.repeats)
        reset_peak(device)
        forward_s = timed(forward, device, args.repeats)
        print(f"{shot:>4} {backbone_s:10.3f} {forward_s:10.3f} {forward_s / backbone_s:6.2f} {peak_memory_mb(device):8.0f}")


if __name__ == "__main__":
    main()
