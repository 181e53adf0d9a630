#!/usr/bin/env bash
# spkr end-to-end demo on CPU: shard the bundled demo corpus, train the tiny Mamba on 2 ranks
# (torchrun, gloo), evaluate (accuracy, EER, minDCF), chart the dataset and the losses.
#   scripts/demo.sh            (env: SHARDS=shards/demo RUN=runs/demo CONFIG=configs/tiny.toml NPROC=2)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS=${SHARDS:-shards/demo}
RUN=${RUN:-runs/demo}
CONFIG=${CONFIG:-configs/tiny.toml}
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=1 # one intra-op thread per rank: 2 ranks on 2 cores
start=$(date +%s)
STEPS=() # "name=seconds" of each step, for the summary

now_ms() { echo $(($(date +%s%N) / 1000000)); }
# step NAME TITLE COMMAND...: run one demo step, then print its wall time
step() {
    local name=$1 title=$2 t0 ms
    shift 2
    echo "== $title"
    t0=$(now_ms)
    "$@"
    ms=$(($(now_ms) - t0))
    STEPS+=("$name=$((ms / 1000)).$((ms % 1000 / 100))")
    echo "== $name took $((ms / 1000)).$((ms % 1000 / 100)) s"
}

step shard "1/5 shard the bundled corpus -> $SHARDS" \
    python -m spkr.tools.shard --source data/demo --subsets train.100 --out "$SHARDS" --workers 2 --overwrite

step train "2/5 train ($NPROC ranks, $CONFIG) -> $RUN" \
    torchrun --standalone --nproc_per_node "$NPROC" -m spkr.train \
    --config "$CONFIG" --shards "$SHARDS" --out "$RUN" --fresh

step evaluate "3/5 evaluate the test split (accuracy, EER, minDCF)" \
    python -m spkr.evaluate --checkpoint "$RUN/last.pt" --shards "$SHARDS" --split test --out "$RUN/eval-test.json"

step chart_dataset "4/5 dataset chart" \
    python -m spkr.tools.chart_dataset --shards "$SHARDS" --out "$RUN"

# valid: every epoch, test: the final checkpoint, both reused from what training measured (metrics.jsonl)
step chart_losses "5/5 loss charts over the per-epoch checkpoints" \
    python -m spkr.tools.chart_losses --run "$RUN" --shards "$SHARDS" --splits valid test

end=$(date +%s)
python - "$RUN" "$((end - start))" "${STEPS[@]}" <<'PY'
import json, sys
run, secs, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
r = json.load(open(f"{run}/eval-test.json"))
v = r.get("verification", {})
print(f"\n== demo done in {secs // 60} min {secs % 60} s")
print("   steps         " + ", ".join(f"{s.split('=')[0]} {s.split('=')[1]} s" for s in steps))
print(f"   test accuracy {100 * r['acc']:.2f}% ({r['n']} utterances), EER {100 * v.get('eer', float('nan')):.2f}%, "
      f"minDCF(0.01) {v.get('min_dcf', float('nan')):.4f}")
print(f"   checkpoint    {run}/last.pt  (per epoch: {run}/ckpt-epochNNN.pt)")
print(f"   metrics       {run}/metrics.jsonl, {run}/eval-test.json")
print(f"   charts        {run}/dataset.png, {run}/losses.png")
print(f"   try           python -m spkr.predict <audio.flac> --checkpoint {run}/last.pt")
PY
