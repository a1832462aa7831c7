#!/usr/bin/env bash
# Does dropping the lowest-scoring teacher targets change the refined row? (issue 23, item 3; embedded default)
#
#   bash bench/score_filter.sh [RUN_DIR] [MAX_STEPS] [NUM_SAMPLES]
#
# Needs the default digit teacher in artifacts/digits-teacher and the classifier in artifacts/digit-classifier
# (`make demo` makes both). One scored cache (scorer.kind=digit_confidence), then two refiners trained on it
# with the same seed and steps, one on every target and one with data.min_score = the cache's 20% quantile
# (the bottom 20% dropped); each run's eval_log.csv holds the guided, unguided and refined rows on the same
# held-out seeds. The figures go into bench/results/ by hand.
set -euo pipefail
RUN=${1:-runs/score-filter}
STEPS=${2:-150}
SAMPLES=${3:-3000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
COMMON=(--config configs/digits.yaml teacher.guidance_scale=1.1 "data.num_samples=$SAMPLES"
        "data.cache_root=$RUN/cache" pipeline.num_workers=0
        scorer.kind=digit_confidence scorer.path=artifacts/digit-classifier)
TRAIN=("train.max_steps=$STEPS" "train.eval_every=$STEPS" "train.checkpoint_every=$STEPS" train.num_loader_workers=0)

python pipeline/generate_targets.py "${COMMON[@]}" | tee "$RUN.generate.log"
Q20=$(grep -o 'q20 [0-9.e+-]*' "$RUN.generate.log" | tail -1 | cut -d' ' -f2)
echo "data.min_score = $Q20 (the cache's 20% quantile)"
python trainer/train.py "${COMMON[@]}" "${TRAIN[@]}" "train.output_dir=$RUN/all"
python trainer/train.py "${COMMON[@]}" "${TRAIN[@]}" "train.output_dir=$RUN/top80" "data.min_score=$Q20"
for run in all top80; do echo "== $run"; cat "$RUN/$run/eval_log.csv"; done
