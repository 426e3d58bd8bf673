#!/usr/bin/env bash
# Train a `recipes` domain on SmolLM2-135M with two processes (see accelerate_config.yaml); the same flags run under
# plain `python -m domain_experts.cli train` or `domain-experts train`, with the same result.
# On GPUs, CONFIG=fsdp_config.yaml shards the model (FSDP2) and CONFIG=deepspeed_zero2_config.yaml partitions the
# optimizer states (DeepSpeed ZeRO-2, needs `pip install deepspeed`).
# Resume after an interruption by running it again with --resume; start it over with --overwrite.
set -euo pipefail
# The corpora's folder: shared/data beside the checkout, or the per-machine cache they are rebuilt into.
DATA=${DATA:-$(python -c "from domain_experts.data import corpus_path; print(corpus_path('recipes', 'train').parent)")}
accelerate launch --config_file "$(dirname "$0")/${CONFIG:-accelerate_config.yaml}" -m domain_experts.cli train \
    --model smollm2 --domain recipes --add-domain --num-blocks 4 --new-tokens 0 \
    --train-file "$DATA/recipes.train.jsonl" --validation-file "$DATA/recipes.validation.jsonl" \
    --block-size 256 --batch-size 8 --gradient-accumulation-steps 2 --learning-rate 5e-4 --warmup-steps 20 \
    --max-steps "${MAX_STEPS:-200}" --checkpoint-steps 50 --eval-steps 50 --output-dir "${OUTPUT_DIR:-runs/recipes}" "$@"
