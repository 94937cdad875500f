#!/usr/bin/env bash
# The paper's module ablations by config, each run over the folds, then one table: rows are the
# variants (EFTNet's round selection against the base model on the same episodes), columns the
# folds, the mean and its paired 95 % interval.
#
#   bash ablation.sh                          # the built-in demo, 4 folds
#   bash ablation.sh pascal resnet50 1 0 1    # dataset backbone shot splits...
#   OPTS="test_num 300" bash ablation.sh      # extra overrides for every variant
#
# "no discrimination" (always the last round) is the reference variant's `last` rule: the same
# fine-tuning trajectory, so it needs no run of its own. VARIANTS may replace the list below
# (lines "name: key value ...").
set -euo pipefail
cd "$(dirname "$0")"
dataset=${1:-demo}
backbone=${2:-}
shot=${3:-1}
[ -n "$backbone" ] || case $dataset in demo) backbone=mobilenetv2 ;; *) backbone=resnet50 ;; esac
default_variants="reference:
no_q2s: q2s_blend False
rounds_3: ft_number 3
rounds_8: ft_number 8
q2s_fraction_0.1: q2s_filt_para 0.1
q2s_fraction_0.4: q2s_filt_para 0.4
blend_0.9_0.1: change_weighting [0.9,0.1]
blend_0.6_0.4: change_weighting [0.6,0.4]"
while IFS=: read -r name opts; do
  [ -n "$name" ] || continue
  echo "== ablation variant $name:${opts:- the reference settings}"
  OPTS="${OPTS:-}${opts:+ $opts}" TAG=ablation_$name bash meta_test.sh "$@"
done <<< "${VARIANTS:-$default_variants}"
echo
root=${EXP:-exp}/$dataset/${ARCH:-MSANet}_${backbone}_${shot}shot
echo "== ablations: $dataset ${ARCH:-MSANet} $backbone ${shot}-shot ($root)"
"${PYTHON:-python3}" -m evaluation.report --ablation "$root" | tee "$root/ablation.txt"
