#!/usr/bin/env bash
# Measure a pixel-generator lever on the stores of a finished run, through the CLI only.
#
#   bash bench/pixel_lever.sh RUN_DIR OUT "GENERATORS" "SETTINGS" "SEEDS" [--set key=value ...]
#   e.g. bash bench/pixel_lever.sh /tmp/run_copy /tmp/mu55 "rep none" "rcg rcg_cfg baseline oracle" "0 1 2" \
#            --set pixel.model.mask_ratio_mu=0.55
#
# Retrains each generator (`rcg train-pixel G`, from scratch: its resume state is removed first), then samples
# and scores every setting at every sampling seed, all with the same --set overrides. RUN_DIR is changed in
# place (its generators and samples are replaced), so point it at a copy of a run, never at your working run.
# OUT receives the logs and one score file per setting and seed: OUT/<setting>_<seed>.json.
set -euo pipefail
if [ $# -lt 5 ]; then
    sed -n '2,11p' "$0" >&2
    exit 2
fi
run_dir=$1 out=$2 generators=$3 settings=$4 seeds=$5
shift 5
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$run_dir"

logged() {  # logged LOG CMD...: run CMD into LOG; on failure show the log's end and stop
    local log=$1
    shift
    "$@" > "$log" 2>&1 || { echo "failed: $* (log: $log)" >&2; tail -5 "$log" >&2; exit 1; }
}

for g in $generators; do
    rm -f "data/state/train_pixel-$g.pt"
    start=$SECONDS
    logged "$out/train_$g.log" rcg train-pixel "$g" "$@"
    echo "train_pixel $g: $((SECONDS - start)) s"
done
for seed in $seeds; do
    for s in $settings; do
        logged "$out/sample_${s}_$seed.log" rcg sample "$s" "$@" --set "sample.seed=$seed"
        logged "$out/score_${s}_$seed.log" rcg score "$s" "$@" --set "sample.seed=$seed"
        cp "metrics/score/$s.json" "$out/${s}_$seed.json"
        python -c "import json, sys; j = json.load(open(sys.argv[1]))['judge']
print(f'{sys.argv[2]} seed {sys.argv[3]}: judge FID {j[\"fid\"]:.2f} IS {j[\"isc\"]:.3f}')" \
            "$out/${s}_$seed.json" "$s" "$seed"
    done
done
