#!/usr/bin/env bash
# The built-in demo as a miniature of the paper's table: MSANet and BAM, 1- and 5-shot, and HSNet
# 1-shot, all four folds (meta_test.sh for each setting), then one table shaped like the paper's:
# a base-model row and an EFTNet row per base model, columns 1-shot and 5-shot, EFTNet's gain in
# parentheses with its paired 95 % interval over the folds. (HSNet's 5-shot s2q decodes 5 x 5
# hypercorrelations per round: about 15 s an episode on this CPU, too slow for the miniature.)
#
#   bash miniature.sh                       # writes exp/miniature/default/demo/... and prints the table
#   OPTS="test_num 200" bash miniature.sh   # more episodes per fold
set -euo pipefail
if [ $# -gt 0 ]; then
  echo "miniature.sh: takes no arguments (got: $*); it runs the demo's four settings: set OPTS, EXP or PYTHON instead" >&2
  exit 2
fi
cd "$(dirname "$0")"
# One output root per OPTS, so that runs of different sizes never mix in one table.
export EXP=${EXP:-exp/miniature/$(echo "${OPTS:-default}" | tr -c 'A-Za-z0-9_.\n-' '_')}
for arch in MSANet BAM; do
  for shot in 1 5; do
    ARCH=$arch bash meta_test.sh demo mobilenetv2 "$shot"
  done
done
ARCH=HSNet bash meta_test.sh demo mobilenetv2 1
echo
echo "== the demo's miniature of the paper's table"
"${PYTHON:-python3}" -m evaluation.report --miniature "$EXP/demo" | tee "$EXP/demo/miniature.txt"
