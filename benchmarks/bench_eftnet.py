"""EFTNet episode time and memory against a plain base-model forward, same process, random weights.

    python benchmarks/bench_eftnet.py [--size 201] [--shots 1 5] [--backbone resnet50] [--device cpu]

Prints, per shot: base forward seconds, EFTNet episode seconds, their ratio, and peak memory
(process peak RSS on CPU, which only grows: the EFTNet figure includes the base run; peak
allocated memory on CUDA, reset before each measurement). The reference code measures about
16.4x (1-shot) and 36.5x (5-shot) for this ratio with R50.
"""
from __future__ import annotations

import argparse
import types

import torch

from benchmarks.common import peak_memory_mb, random_episode, reset_peak, timed
from model import MSANet
from model.eftnet import EFTNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=201)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", default="pseudo", choices=["pseudo", "ground_truth"])
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device {device}, {args.backbone}, {args.size} px, threads {torch.get_num_threads()}, s2q query mask {args.mode}")
    print(f"{'shot':>4} {'base s':>8} {'EFTNet s':>9} {'ratio':>6} {'base peak MB':>13} {'EFTNet peak MB':>15}")
    for shot in args.shots:
        model = MSANet(args.backbone, shot, 15).to(device).eval()
        cfg = types.SimpleNamespace(ft_number=5, ft_base_lr=0.005, ft_power=0.9, momentum=0.9, weight_decay=1e-4,
                                    sr_aux_weight1=0.9, change_weighting=[0.8, 0.2], q2s_filt_para=0.2,
                                    s2q_query_mask=args.mode)
        engine = EFTNet(model, cfg)
        ep = random_episode(args.size, shot, device)
        query_mask = ep["support_masks"][:, 0] if args.mode == "ground_truth" else None

        def base() -> None:
            with torch.no_grad():
                model(ep["query_img"], ep["support_imgs"], ep["support_masks"])

        def eft() -> None:
            engine.adapt(ep["query_img"], ep["support_imgs"], ep["support_masks"], ep["padding"], query_mask)

        reset_peak(device)
        base_s = timed(base, device, args.repeats)
        base_mb = peak_memory_mb(device)
        reset_peak(device)
        eft_s = timed(eft, device, args.repeats)
        eft_mb = peak_memory_mb(device)
        print(f"{shot:>4} {base_s:8.3f} {eft_s:9.3f} {eft_s / base_s:6.2f} {base_mb:13.0f} {eft_mb:15.0f}")


if __name__ == "__main__":
    main()
