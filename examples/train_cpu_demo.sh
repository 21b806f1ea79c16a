#!/bin/bash
# The README's main job: on a fresh machine, with nothing downloaded, make a corpus, preprocess it,
# train a tiny RWKV-7, expand it to RWKV-X, and run both RWKV-X stages (stage 2 on two processes
# with context parallelism, then a LongCE phase), all on the CPU.
#
#   bash examples/train_cpu_demo.sh                 # a few minutes on 2 cores
#   DEMO_SIZE=test bash examples/train_cpu_demo.sh  # the seconds-long form the tests run
#   OUT=/path/to/dir bash examples/train_cpu_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo_output}
PYTHON=${PYTHON:-python}
DEMO_SIZE=${DEMO_SIZE:-full}
if [[ "$DEMO_SIZE" == test ]]; then
  DOCS=120; SEQ0=64; ITERS0=4; SEQ1=64; ITERS1=3; SEQ2=128; ITERS2=3; LCE_ITERS=2; CHUNK=32; EVAL=1; PASSKEY_LENGTHS=64
else
  DOCS=1000; SEQ0=128; ITERS0=60; SEQ1=128; ITERS1=20; SEQ2=256; ITERS2=16; LCE_ITERS=6; CHUNK=64; EVAL=4; PASSKEY_LENGTHS=128,256
fi
# The tiny model: width 128, heads of 32, 4 RWKV-7 blocks; the World vocabulary (65,536).
MODEL=(--hidden-size 128 --head-size 32)
COMMON=(--device cpu --split 95,5,0 --eval-iters "$EVAL" --log-interval 2 --tokenizer-type RWKVWorldTokenizer)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
step() { echo; echo "=== $* ==="; }

step "1. sample corpus (standard-library docstrings) -> $OUT/corpus"
"$PYTHON" tools/make_sample_corpus.py --output "$OUT/corpus" --num-docs "$DOCS" --overwrite

step "2. tokenize into a megatron indexed dataset -> $OUT/data"
"$PYTHON" tools/preprocess_data.py --input "$OUT/corpus/text.jsonl" --output-prefix "$OUT/data/sample" \
  --tokenizer-type RWKVWorldTokenizer --append-eod --workers 2 --overwrite
DATA="$OUT/data/sample_text_document"

step "3. train a tiny RWKV-7 from scratch (the 'pretrained base')"
rm -rf "$OUT/checkpoints/rwkv7"
"$PYTHON" -m megatron_rwkvx.pretrain "${MODEL[@]}" --layer-pattern RRRR "${COMMON[@]}" \
  --data-path "$DATA" --seq-length "$SEQ0" --micro-batch-size 4 --global-batch-size 4 \
  --train-iters "$ITERS0" --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 2 \
  --eval-interval "$ITERS0" --save "$OUT/checkpoints/rwkv7" --tensorboard-dir "$OUT/tensorboard/rwkv7"
"$PYTHON" tools/export_checkpoint.py --load "$OUT/checkpoints/rwkv7" --output "$OUT/rwkv7-tiny.pth" \
  --dtype fp32 --overwrite

step "4. expand RWKV-7 -> RWKV-X (RRARRA, zero-init sparse blocks: the same outputs as the base)"
rm -rf "$OUT/checkpoints/rwkvx-expanded"
"$PYTHON" tools/convert_rwkv7_to_rwkvx.py --input "$OUT/rwkv7-tiny.pth" \
  --output "$OUT/checkpoints/rwkvx-expanded" --num-sparse-blocks 2 --output-format megatron

step "5. stage 1: only the sparse-attention blocks train (base frozen)"
rm -rf "$OUT/checkpoints/stage1"
"$PYTHON" -m megatron_rwkvx.pretrain --init-from "$OUT/checkpoints/rwkvx-expanded" --train-only sparse \
  "${COMMON[@]}" --data-path "$DATA" --seq-length "$SEQ1" --micro-batch-size 4 --global-batch-size 4 \
  --train-iters "$ITERS1" --lr 1e-3 --lr-warmup-iters 1 --sparse-chunk-size "$CHUNK" --sparse-top-k 2 \
  --eval-interval "$ITERS1" --save "$OUT/checkpoints/stage1" --tensorboard-dir "$OUT/tensorboard/stage1"

step "6. stage 2: everything trains, longer context, 2 processes with context parallelism"
rm -rf "$OUT/checkpoints/stage2"
"$PYTHON" -m torch.distributed.run --nproc-per-node 2 --master-port "${DEMO_PORT:-29561}" \
  -m megatron_rwkvx.pretrain --init-from "$OUT/checkpoints/stage1" --context-parallel-size 2 \
  "${COMMON[@]}" --data-path "$DATA" --seq-length "$SEQ2" --micro-batch-size 2 --global-batch-size 2 \
  --train-iters "$ITERS2" --lr 5e-4 --lr-warmup-iters 1 --sparse-chunk-size "$CHUNK" --sparse-top-k 2 \
  --eval-interval "$ITERS2" --save "$OUT/checkpoints/stage2" --tensorboard-dir "$OUT/tensorboard/stage2"

step "7. LongCE phase (short-context re-weighting of the long-context loss)"
rm -rf "$OUT/checkpoints/stage2-longce"
"$PYTHON" -m megatron_rwkvx.pretrain --init-from "$OUT/checkpoints/stage2" --loss longce \
  --longce-window $((SEQ2 / 2)) --longce-stride $((SEQ2 / 4)) --longce-tau 10 \
  "${COMMON[@]}" --data-path "$DATA" --seq-length "$SEQ2" --micro-batch-size 2 --global-batch-size 2 \
  --train-iters "$LCE_ITERS" --lr 2e-4 --sparse-chunk-size "$CHUNK" --sparse-top-k 2 \
  --eval-interval "$LCE_ITERS" --save "$OUT/checkpoints/stage2-longce" --tensorboard-dir "$OUT/tensorboard/longce"
"$PYTHON" tools/export_checkpoint.py --load "$OUT/checkpoints/stage2-longce" --output "$OUT/rwkvx-tiny.pth" \
  --dtype fp32 --overwrite

step "8. passkey retrieval with exact incremental decoding (a tiny model: do not expect it to pass)"
"$PYTHON" tools/eval_passkey.py --model "$OUT/rwkvx-tiny.pth" --set sparse_chunk_size="$CHUNK" \
  --set sparse_top_k=2 --lengths "$PASSKEY_LENGTHS" --depths 3 --seeds 1 --output-dir "$OUT/passkey"

echo
echo "=== done ==="
echo "checkpoints : $OUT/checkpoints/{rwkv7,rwkvx-expanded,stage1,stage2,stage2-longce}"
echo "exported    : $OUT/rwkv7-tiny.pth (RWKV-7 layout), $OUT/rwkvx-tiny.pth (RWKV-X reference layout)"
echo "passkey     : $OUT/passkey/passkey.md (table), passkey.png (heatmap)"
echo "tensorboard : tensorboard --logdir $OUT/tensorboard"
echo "load it     : python -c \"import megatron_rwkvx; m = megatron_rwkvx.load_pretrained('$OUT/rwkvx-tiny.pth', sparse_chunk_size=$CHUNK, sparse_top_k=2)\""
