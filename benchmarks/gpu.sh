#!/usr/bin/env bash
# One command, one H100-class GPU, under 4 minutes: timings, peak memory and ratios as JSON,
# then the gpu-marked tests.
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # default OUT_DIR: ${OUT:-bench_gpu}
#
# 1. GPT-2 small shapes (124M, random weights), bf16, B=32, T=128: RelP, AtP, IG (2 prompts), AP (1 prompt,
#    block 5), each in a fresh process; CUDA peak = torch.cuda.max_memory_allocated above the weights.
# 2. Sequence-length sweep (T = 16, 64, 256, 1024; B=8) of RelP and AtP on GPT-2 small, bf16.
# 3. Llama-3.2-1B shapes (1.2B params, 128k vocabulary, random weights), bf16, B=16, T=256: RelP and AtP.
# 4. SmolLM2-135M shapes (30 layers, d=576, random weights), bf16: RelP and AtP at B=32, T=128, and AP
#    (position granularity, default strategy) on 4 prompts of 15 tokens.
# 5. pytest -m gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench_gpu}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT_DIR/gpu.csv" || true
COMMON=(--device cuda --dtype bfloat16 --repeats 3)

step() {  # a step that fails or runs out of time is recorded; the others still run
    local limit=$1; shift
    timeout "$limit" "$@" || echo "exit $?: $*" >> "$OUT_DIR/errors.txt"
}
step 80 $PY benchmarks/bench_methods.py "${COMMON[@]}" --n-prompts 32 --seq-len 128 \
    --methods AtP,RelP,IG,AP --ig-prompts 2 --ap-prompts 1 --ap-batch-size 64 \
    --out "$OUT_DIR/gpt2_small_B32_T128.json"
step 70 $PY benchmarks/bench_compare.py --no-baseline "${COMMON[@]}" --repeats 1 --methods AtP,RelP \
    --n-prompts 8 --seq-lens 16,64,256,1024 --out "$OUT_DIR/gpt2_small_sweep_B8.json"
step 50 $PY benchmarks/bench_methods.py "${COMMON[@]}" --arch llama-1b --n-prompts 16 --seq-len 256 \
    --methods AtP,RelP --out "$OUT_DIR/llama1b_B16_T256.json"
step 40 $PY benchmarks/bench_methods.py "${COMMON[@]}" --arch smollm2-135m --n-prompts 32 --seq-len 128 \
    --methods AtP,RelP --out "$OUT_DIR/smollm2_135m_B32_T128.json"
step 40 $PY benchmarks/bench_methods.py "${COMMON[@]}" --arch smollm2-135m --n-prompts 4 --seq-len 15 \
    --methods AP --ap-batch-size 64 --out "$OUT_DIR/smollm2_135m_AP_B4_T15.json"
step 30 $PY -m pytest -q -p no:cacheprovider -m gpu tests -o log_cli=false > "$OUT_DIR/pytest_gpu.txt" 2>&1

$PY - "$OUT_DIR" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
summary = {"gpu": (out / "gpu.csv").read_text() if (out / "gpu.csv").exists() else None}
for name in ("gpt2_small_B32_T128", "gpt2_small_sweep_B8", "llama1b_B16_T256", "smollm2_135m_B32_T128",
             "smollm2_135m_AP_B4_T15"):
    path = out / f"{name}.json"
    if path.exists():
        summary[name] = json.loads(path.read_text())
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(f"wrote {out / 'summary.json'}")
PYEOF
