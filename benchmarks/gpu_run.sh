python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
# One GPU benchmark run (H100/H200), under 7 minutes in all; results in $OUT (2 files):
#   $OUT/gpu_results.json  a list, one entry per part (bench.py's JSON; failures recorded), rewritten after each part
#   $OUT/gpu_run.log       the full log, ending with the summary table
# Parts (each with its own timeout inside a total budget; one failing does not stop the rest):
#   a  SmolLM2-135M shape, bf16, 4 x 128: ours vs PyTorch + PEFT
#   b  Llama-3.2-1B shape, bf16, 4 x 2048: ours (the default attention: cuDNN flash) vs PyTorch + PEFT
#      (sdpa), then 3 steps traced: where the step's time goes, by kernel kind (flax_lora.perf.trace)
#   c  Llama-3.2-1B shape, bf16, 8 x 2048, remat: ours
#   every part records tokens/s, MFU (LoRA-aware FLOPs), peak memory and the advisor's estimate
# GPU_RUN_TINY=1: a CPU dry run of the same logic on tiny shapes.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
PARTS=$(mktemp -d /tmp/gpu_parts.XXXX)  # per-part files stay outside $OUT
START=$(date +%s)
BUDGET=${GPU_RUN_BUDGET:-390}  # seconds for all parts (the install is before START)
exec > >(tee -a "$LOG") 2>&1

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

summary() {  # merge the parts so far into $OUT/gpu_results.json and print the table
  python3 benchmarks/gpu_summary.py "$PARTS" "$OUT/gpu_results.json"
}

part() {  # part NAME TIMEOUT ENV... -- BENCH ARGS...
  local name=$1 limit=$2; shift 2
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  local rem; rem=$(left)
  [ "$rem" -lt "$limit" ] && limit=$rem
  if [ "$limit" -lt 20 ]; then
    echo "== $name: skipped (no time left)"
    echo "{\"part\": \"$name\", \"error\": \"skipped: no time left\"}" > "$PARTS/$name.json"
    return
  fi
  echo "== $name (timeout ${limit}s) $(date +%T): ${envs[*]} bench.py $*"
  env "${envs[@]}" timeout -k 10 "$limit" python3 benchmarks/bench.py "$@" --json "$PARTS/$name.raw"
  python3 benchmarks/gpu_summary.py --part "$name" "$?" "$PARTS/$name.raw" "$PARTS/$name.json" "${envs[*]}"
  summary > /dev/null
}

python3 -c "import jax, platform; print('python', platform.python_version(), 'jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true

if [ "${GPU_RUN_TINY:-0}" = "1" ]; then
  SMALL="--preset tiny --steps 2 --warmup 1"
  BIG="--preset tiny --seq 64 --steps 2 --warmup 1"
  T_A=150; T_B=200; T_C=150; ATT=auto
else
  SMALL="--preset smollm2-135m --steps 20 --warmup 3"
  BIG="--preset llama-1b --seq 2048 --steps 8 --warmup 2"
  T_A=100; T_B=170; T_C=90; ATT=cudnn
fi
COMMON="--precision bf16 --r 8 --alpha 16 --targets q_proj,k_proj,v_proj,o_proj"

part a "$T_A" LORA_ATTENTION=$ATT -- $SMALL $COMMON --batch 4 --seq 128 --torch --torch-timeout 60
part b "$T_B" LORA_ATTENTION=$ATT -- $BIG $COMMON --batch 4 --torch --torch-timeout 80 --profile "$PARTS/trace"
part c "$T_C" LORA_ATTENTION=$ATT -- $BIG $COMMON --batch 8 --remat

summary
rm -rf "$PARTS"
echo "done in $(( $(date +%s) - START ))s"
