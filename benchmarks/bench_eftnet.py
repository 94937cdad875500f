"""EFTNet episode time and memory against a plain base-model forward, same process, random weights.

    python -m benchmarks.bench_eftnet [--sizes 201 473 641] [--backbones resnet50 vgg] [--shots 1 5]
                                      [--archs MSANet BAM HSNet] [--device cpu|cuda] [--direct]

One line per setting, each measured in a fresh process (so that the CPU's peak RSS belongs to
that setting): the plain forward (the base model's prediction), the EFTNet episode (5 rounds),
their ratio (medians over repeats that run the parts in turn, so a changing load weighs on
both alike), and peak memory (process peak RSS on CPU, which includes the plain forward's;
``torch.cuda.max_memory_allocated`` on CUDA, reset before each part). ``--direct`` adds the
episode matched directly every round (``similarity_cache_mb 0``); ``--probe`` the episode
with the evaluator's extra ground-truth s2q score per round (``s2q_gt_scores``) and its cost;
``--votes`` the time of the vote rules' predictions (model/round_selection.py), which the engine
computes in every episode from the rounds it has, and their share of the episode. The
random model is biased to predict about 30 % of the query as foreground, like a trained model
on an object. The reference code measures about 16.4x (1-shot) and 36.5x (5-shot) for this
ratio with R50 at 201 px. HSNet runs with its released widths and ``--hsnet-pass-mb`` (the
config's ``hsnet_pass_mb``) as the memory of one learner pass; its protocol's size is 400 px.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time

import torch

from benchmarks.common import interleaved_times, peak_memory_mb, predict_foreground, random_episode, reset_peak
from model import BAM, HSNet, MSANet
from model.eftnet import EFTNet, EFTNetSettings
from model.round_selection import VOTE_RULES

HEADER = (f"{'arch':>6} {'backbone':>9} {'px':>4} {'shot':>4} {'base s':>7} {'EFTNet s':>8} {'ratio':>6} "
          f"{'base MB':>8} {'EFTNet MB':>9} {'extra MB':>8}")


def engine_settings(cache_mb: float, mode: str) -> EFTNetSettings:
    return EFTNetSettings(aux_weight=0.9, query_mask_source=mode, similarity_cache_mb=cache_mb)


def measure(arch: str, backbone: str, size: int, shot: int, device: torch.device, repeats: int,
            cache_mb: float, mode: str, direct: bool, probe: bool, cpu_clock: bool = False,
            votes: bool = False, pass_mb: float = 1024) -> dict:
    """Times and peaks of one setting, in this process."""
    torch.manual_seed(0)
    if arch == "HSNet":
        model = HSNet(backbone, shot, pass_mb=pass_mb).to(device).eval()
    else:
        model = (MSANet if arch == "MSANet" else BAM)(backbone, shot, 15).to(device).eval()
    ep = random_episode(size, shot, device)
    predict_foreground(model, ep)
    query_mask = ep["support_masks"][:, 0]

    def base() -> None:
        with torch.no_grad():
            model(ep["query_img"], ep["support_imgs"], ep["support_masks"])

    def episode(mb: float, observer=None):
        engine = EFTNet(model, engine_settings(mb, mode))
        return lambda: engine.adapt(ep["query_img"], ep["support_imgs"], ep["support_masks"], ep["padding"],
                                    query_mask, observer=observer)

    parts = {"base": base, "eft": episode(cache_mb)}
    if direct:
        parts["direct"] = episode(0)
    if probe:
        parts["probe"] = episode(cache_mb, lambda p: p.s2q_score(query_mask))
    if votes:
        rounds = parts["eft"]()
        finals = [r.final for r in rounds.rounds]
        parts["votes"] = lambda: {name: rule(finals, rounds.round_scores) for name, rule in VOTE_RULES.items()}
    out = {}
    for name, fn in parts.items():  # warm-up; base first, as the CPU's peak RSS only grows
        reset_peak(device)
        fn()
        out[f"{name}_mb"] = peak_memory_mb(device)
    clock = time.process_time if cpu_clock else time.perf_counter
    out.update({f"{name}_s": t for name, t in interleaved_times(parts, device, repeats, clock).items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[201, 473])
    parser.add_argument("--backbones", nargs="+", default=["resnet50"])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--archs", nargs="+", default=["MSANet"], choices=["MSANet", "BAM", "HSNet"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each part after one warm-up (median)")
    parser.add_argument("--cache-mb", type=float, default=1024, help="similarity_cache_mb of the engine")
    parser.add_argument("--hsnet-pass-mb", type=float, default=1024, help="HSNet: memory of one learner pass")
    parser.add_argument("--mode", default="pseudo", choices=["pseudo", "ground_truth"])
    parser.add_argument("--direct", action="store_true", help="also time the episode with similarity_cache_mb 0")
    parser.add_argument("--cpu-clock", action="store_true",
                        help="CPU seconds of the process instead of wall time (a shared machine; use 1 thread)")
    parser.add_argument("--probe", action="store_true", help="also time the episode with ground-truth s2q scores")
    parser.add_argument("--votes", action="store_true", help="also time the vote rules' predictions")
    parser.add_argument("--one", nargs=4, metavar=("ARCH", "BACKBONE", "SIZE", "SHOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.one:
        arch, backbone, size, shot = args.one
        print(json.dumps(measure(arch, backbone, int(size), int(shot), device, args.repeats, args.cache_mb,
                                 args.mode, args.direct, args.probe, args.cpu_clock, args.votes,
                                 args.hsnet_pass_mb)))
        return
    print(f"device {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
          f"threads {torch.get_num_threads()}, {'CPU' if args.cpu_clock else 'wall'} seconds, "
          f"s2q query mask {args.mode}, similarity_cache_mb {args.cache_mb:g}")
    print(HEADER + (f" {'direct s':>8} {'ratio':>6}" if args.direct else "")
          + (f" {'probe s':>8} {'cost':>6}" if args.probe else "")
          + (f" {'votes s':>8} {'cost':>6}" if args.votes else ""), flush=True)
    flags = ("direct", "probe", "cpu_clock", "votes")
    common = ["--device", args.device, "--repeats", str(args.repeats), "--cache-mb", str(args.cache_mb),
              "--hsnet-pass-mb", str(args.hsnet_pass_mb), "--mode", args.mode] + [f"--{flag.replace('_', '-')}" for flag in flags if getattr(args, flag)]
    for arch, backbone, size, shot in itertools.product(args.archs, args.backbones, args.sizes, args.shots):
        child = subprocess.run([sys.executable, "-m", "benchmarks.bench_eftnet", "--one", arch, backbone,
                                str(size), str(shot), *common], capture_output=True, text=True)
        if child.returncode != 0:
            print(f"{arch:>6} {backbone:>9} {size:>4} {shot:>4} failed: {child.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(child.stdout.strip().splitlines()[-1])
        line = (f"{arch:>6} {backbone:>9} {size:>4} {shot:>4} {r['base_s']:7.3f} {r['eft_s']:8.3f} "
                f"{r['eft_s'] / r['base_s']:6.2f} {r['base_mb']:8.0f} {r['eft_mb']:9.0f} "
                f"{r['eft_mb'] - r['base_mb']:8.0f}")
        if args.direct:
            line += f" {r['direct_s']:8.3f} {r['direct_s'] / r['base_s']:6.2f}"
        if args.probe:
            line += f" {r['probe_s']:8.3f} {100 * (r['probe_s'] / r['eft_s'] - 1):+5.0f}%"
        if args.votes:
            line += f" {r['votes_s']:8.4f} {100 * r['votes_s'] / r['eft_s']:5.1f}%"
        print(line, flush=True)


if __name__ == "__main__":
    main()
