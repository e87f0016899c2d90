#!/usr/bin/env bash
# The GPU measurements issue 7 still owes, in priority order, sized for a lent device (the `run` tool:
# at most 10 minutes per command, 30 minutes per session). Run one step per call, from the repo root:
#
#     bash bench/gpu_suite.sh STEP        STEP = 1 | 2 | 3 | 4
#
# Results land in $OUT/results/<device>/ (default: /tmp/jaxmoe-gpu-suite), ready to copy into
# bench/results/<device>/; re-draw plots here with `python -m bench sizes --plot-only FILE.json`.
#   1  predictor cost fused vs host (the < 5% target), host work per MoE layer (Qwen3 and Mixtral shapes),
#      with a jax.profiler trace of one Qwen3-shape generation (where the H100's 1.2 ms per layer goes)
#   2  Qwen3-30B-A3B: 10/25/50/100% cache, on-demand / presched / oracle, resident (58 GB experts fit an 80 GB GPU)
#   3  Mixtral-8x7B at 50%: the policies the last run's time budget cut (lfu, prefetch, presched, oracle)
#   4  OLMoE-1B-7B and DeepSeek-V2-Lite: every cache size, every policy, resident
# SMOKE=1 shrinks every step to seconds (CPU check of the commands themselves).
set -euo pipefail
step="${1:?usage: bash bench/gpu_suite.sh STEP (1-4)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
device="$(python -c 'from bench.policies import device_name; print(device_name())' 2>/dev/null)"
out="${OUT:-/tmp/jaxmoe-gpu-suite}/results/$device"
mkdir -p "$out"
small=()
budget=480
if [[ "${SMOKE:-0}" == 1 ]]; then
  small=(--scale 0.01 --layers 2 --tokens 3 --repeats 1)
  budget=60
fi
sizes() { python -m bench sizes --peer none --time-budget "$budget" --out "$out" "$@" "${small[@]}"; }
case "$step" in
  1)
    if [[ "${SMOKE:-0}" == 1 ]]; then cost=(--calls 5); else cost=(); fi
    python -m bench predictor-cost --out "$out" "${cost[@]}"
    python -m bench host-overhead --out "$out" --profile "$out/trace-host-overhead" "${small[@]}"
    python -m bench host-overhead --shape mixtral-8x7b --name host_overhead-mixtral --out "$out" "${small[@]}"
    ;;
  2) sizes --shape qwen3-30b-a3b --cache 0.1,0.25,0.5,1.0 --policies on-demand,presched,oracle --tokens 16 ;;
  3) sizes --shape mixtral-8x7b --cache 0.5 --policies lfu,prefetch,presched,oracle --tokens 16 --skip-resident ;;
  4)
    sizes --shape olmoe-1b-7b --tokens 16
    sizes --shape deepseek-v2-lite --tokens 16 --cache 0.1,0.25,0.5
    ;;
  *) echo "error: bench/gpu_suite.sh: unknown step '$step' (1-4)" >&2; exit 2 ;;
esac
ls -l "$out"
