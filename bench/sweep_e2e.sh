#!/usr/bin/env bash
# Hyper-parameter sweep of the end_to_end objective: one bench/quality.py run per setting, one setting
# after another, each running its seeds in parallel (--jobs = number of seeds, the cores shared among
# them). Meant for a machine with many cores and a GPU. (Launching all 8 settings at once, 24 workers
# on 16 cores, finished nothing within 5 minutes on an H200 machine: model loading and the CPU-side
# assignments starve each other.)
# Usage: bash bench/sweep_e2e.sh OUTPUT_DIR [DEVICE] [SEEDS...]
set -uo pipefail
out=${1:?usage: bash bench/sweep_e2e.sh OUTPUT_DIR [DEVICE] [SEEDS...]}
device=${2:-cuda}
shift $(( $# >= 2 ? 2 : 1 ))
seeds=${*:-0 1 2}
mkdir -p "$out"
settings=(  # name : method : PermuteConfig/LearnConfig overrides
  "gather-base:learned end_to_end (gather):"
  "gather-steps40:learned end_to_end (gather):steps=40"
  "gather-lr0.2:learned end_to_end (gather):lr=0.2"
  "gather-alpha1:learned end_to_end (gather):alpha=1.0"
  "gather-seq4:learned end_to_end (gather):sequences_per_step=4"
  "gather-block128:learned end_to_end (gather):block_size=128"
  "exact-base:learned end_to_end (exact):"
  "exact-steps40:learned end_to_end (exact):steps=40"
)
n=$(echo $seeds | wc -w)
for setting in "${settings[@]}"; do
  IFS=: read -r name method overrides <<<"$setting"
  python3 bench/quality.py --num-samples 16 --eval-samples 16 --device "$device" --jobs "$n" \
    --seeds $seeds --methods "$method" ${overrides:+--set $overrides} --output "$out/sweep-$name.json" \
    >"$out/sweep-$name.log" 2>&1
done
for setting in "${settings[@]}"; do
  name=${setting%%:*}
  python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['rows']; print(sys.argv[2], [round(x['perplexity'],2) for x in r], [round(x.get('seconds',0)) for x in r])" \
    "$out/sweep-$name.json" "$name" 2>/dev/null || { echo "$name failed:"; tail -5 "$out/sweep-$name.log"; }
done
