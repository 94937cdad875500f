#!/usr/bin/env bash
# Meta-test several folds one after another, then print a table of all folds and their mean.
#
#   bash meta_test.sh                                  # the built-in demo: 4 folds, 1-shot
#   bash meta_test.sh pascal resnet50 1 0 1 2 3        # dataset backbone shot splits...
#   ARCH=BAM bash meta_test.sh demo mobilenetv2 5      # EFTNet on BAM (the config's weight_bam* files)
#   ARCH=HSNet bash meta_test.sh demo mobilenetv2 1    # EFTNet on HSNet (weight_hsnet)
#   CONFIG_DIR=config/hsnet bash meta_test.sh pascal resnet50 1   # HSNet under its own protocol
#   bash miniature.sh                                  # the demo's miniature of the paper's table
#   OPTS="s2q_query_mask ground_truth" bash meta_test.sh pascal vgg 1
#   OPTS="s2q_gt_scores True" bash meta_test.sh pascal resnet50 1   # also report the reference's round
#       selection on the same episodes (an evaluation-only s2q pass with the query label: +16 % time at
#       473 px 1-shot, +42 % at 5-shot; on by default in the demo configs)
#   bash ablation.sh [dataset backbone shot splits...]            # the module ablations, one table
#
# ARCH: base model, MSANet (default), BAM or HSNet (config/hsnet/ sets HSNet itself).
# CONFIG_DIR: where the configs are (default config/<dataset>; config/hsnet: HSNet's protocol).
# OPTS: extra config overrides passed to every run (key value ...).
# TAG:  suffix of the output folder, to keep variants apart (default: derived from OPTS).
# EXP:  output root (default exp).
# PYTHON: interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")"
dataset=${1:-demo}
backbone=${2:-}
shot=${3:-1}
shift $(( $# < 3 ? $# : 3 ))
splits=${*:-0 1 2 3}
if [ -z "$backbone" ]; then
  case $dataset in demo) backbone=mobilenetv2 ;; *) backbone=resnet50 ;; esac
fi
python=${PYTHON:-python3}
configs=${CONFIG_DIR:-config/$dataset}
if [ -z "${ARCH:-}" ] && [ "$configs" = "config/hsnet" ]; then
  arch=HSNet  # its configs are HSNet's
else
  arch=${ARCH:-MSANet}
fi
root=${EXP:-exp}/$dataset/${arch}_${backbone}_${shot}shot${CONFIG_DIR:+_$(basename "$configs")}
read -r -a opts <<< "${OPTS:-}"
tag=${TAG:-$(echo "${OPTS:-default}" | tr -c 'A-Za-z0-9_.\n-' '_')}
results=()
for split in $splits; do
  config=$configs/${dataset}_split${split}_${backbone}.yaml
  [ -f "$config" ] || { echo "meta_test.sh: no config $config" >&2; exit 2; }
  out=$root/$tag/split$split
  mkdir -p "$out"
  echo "== $config -> $out"
  # Both streams are kept in the log (-a: a failed run must not cost the log of an earlier one),
  # and each stays on its own stream here, so errors reach stderr.
  "$python" meta_test.py --config "$config" --arch "$arch" --exp-dir "$out" --opts shot "$shot" "${opts[@]}" \
    > >(tee -a "$out/meta_test.log") 2> >(tee -a "$out/meta_test.log" >&2)
  results+=("$out/results.json")
done
echo
echo "== $dataset $arch $backbone ${shot}-shot, folds: $splits"
"$python" -m evaluation.report "${results[@]}" | tee "$root/$tag/summary.txt"
