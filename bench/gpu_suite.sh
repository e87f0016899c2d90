#!/usr/bin/env bash
# The GPU measurements issue 7 still owes, in priority order, sized for a lent device (the `run` tool:
# at most 10 minutes per command, 30 minutes per session). Run one step per call, from the repo root:
#
#     bash bench/gpu_suite.sh STEP        STEP = 1 .. 14
#
# Results land in $OUT/results/<device>/ (default: /tmp/jaxmoe-gpu-suite), ready to copy into
# bench/results/<device>/; re-draw plots here with `python -m bench sizes --plot-only FILE.json`.
# Each `bench sizes` call starts no new run after its --time-budget (BUDGET seconds, default 420), so a
# step fits one call; the H100 took 35-70 s per (policy, cache) run and 40-80 s to build a shape.
#   1  predictor cost fused vs host (the < 5% target), host work per MoE layer (Qwen3 and Mixtral shapes),
#      layer by layer and as whole-token steps (--speculate on), with a jax.profiler trace of one
#      Qwen3-shape generation (where the H100's 1.2 ms per layer goes)
#   2  Qwen3-30B-A3B at 25% and 100% cache: on-demand / presched / oracle, then resident (58 GB of experts
#      fit an 80 GB GPU)
#   3  int8 experts (half the bytes per copy): Qwen3-30B-A3B at 25% and 50%, on-demand / presched / oracle
#      (sizes-qwen3-30b-a3b-int8.*; compare with step 2's unquantized rows)
#   4  Mixtral-8x7B with int8 experts at 100% cache (45 GB of experts: the whole model on an 80 GB GPU), on-demand
#   5  demand copies 4 deep (--copies-in-flight 4): Qwen3-30B-A3B at 25%, on-demand / presched; worth it where
#      the "pinned copies at once" bandwidth in the sizes tables beats the one-at-a-time figure
#   6  Mixtral-8x7B at 50%: the policies the last run's time budget cut (lfu, prefetch, presched, oracle)
#   7  Qwen3-30B-A3B at 50%: on-demand / presched / oracle
#   8  OLMoE-1B-7B and DeepSeek-V2-Lite: 10/25/50% cache, on-demand / presched / oracle, resident
#   9  (run it second, after 1) Qwen3-30B-A3B at 10%: on-demand / presched. On the H100 (2026-11-23) presched
#      decoded slower than on-demand there (2.25 vs 2.57 tok/s) with more hits, less stall and fewer bytes:
#      ~110 ms/token more non-stall time. The table's "host CPU ms/tok: loop, transfers" column says
#      whether that is the transfer thread's CPU (claims, copies, slot writes) taking the interpreter lock
#      from the decode loop
#   10 GLM-4.5-Air (199 GB of experts: bench.sizes keeps the layers that fit host memory): 10% and 25% cache,
#      on-demand / presched / oracle
#   11 gpt-oss-20b (38 GB of bfloat16 experts, 49.8 MB each, top-4 of 32): 10% and 25% cache, on-demand /
#      presched / oracle; then the same at 25% with --quantize-experts mxfp4 (the Hub's own 4-bit experts,
#      lossless for a checkpoint converted from them: 0.27x the bytes per copy)
#   12 MiniMax-M2 (449 GB of experts, 28.3 MB each, top-8 of 256 in all 62 layers: bench.sizes keeps the layers
#      that fit host memory): 10% and 25% cache, on-demand / presched / oracle
#   13 Qwen3-Next-80B-A3B (155 GB of experts, 6.3 MB each, top-10 of 512 in 48 layers; 36 Gated DeltaNet
#      layers): 10% and 25% cache, on-demand / presched / oracle
#   14 Qwen3.5-35B-A3B's language model (64 GB of experts, 6.3 MB each, top-8 of 256 in 40 layers; 30 Gated
#      DeltaNet layers): 10% and 25% cache, on-demand / presched / oracle
# SMOKE=1 shrinks every step to seconds (CPU check of the commands themselves).
set -euo pipefail
step="${1:?usage: bash bench/gpu_suite.sh STEP (1-14)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
device="$(python -c 'from bench.policies import device_name; print(device_name())' 2>/dev/null)"
out="${OUT:-/tmp/jaxmoe-gpu-suite}/results/$device"
mkdir -p "$out"
small=()
budget="${BUDGET:-420}"
if [[ "${SMOKE:-0}" == 1 ]]; then
  small=(--scale 0.01 --layers 2 --tokens 3 --repeats 1)
  budget=60
fi
sizes() { python -m bench sizes --peer none --time-budget "$budget" --out "$out" "$@" "${small[@]}"; }
three=(--policies on-demand,presched,oracle --tokens 16)
case "$step" in
  1)
    if [[ "${SMOKE:-0}" == 1 ]]; then cost=(--calls 5); else cost=(); fi
    python -m bench predictor-cost --out "$out" "${cost[@]}"
    python -m bench host-overhead --out "$out" --profile "$out/trace-host-overhead" "${small[@]}"
    python -m bench host-overhead --shape mixtral-8x7b --name host_overhead-mixtral --out "$out" "${small[@]}"
    ;;
  2) sizes --shape qwen3-30b-a3b --cache 0.25,1.0 "${three[@]}" ;;
  3) sizes --shape qwen3-30b-a3b --cache 0.25,0.5 "${three[@]}" --skip-resident --quantize-experts int8 ;;
  4) sizes --shape mixtral-8x7b --cache 1.0 --policies on-demand --tokens 16 --skip-resident --quantize-experts int8 ;;
  5) sizes --shape qwen3-30b-a3b --cache 0.25 --policies on-demand,presched --tokens 16 --skip-resident --copies-in-flight 4 ;;
  6) sizes --shape mixtral-8x7b --cache 0.5 --policies lfu,prefetch,presched,oracle --tokens 16 --skip-resident ;;
  7) sizes --shape qwen3-30b-a3b --cache 0.5 "${three[@]}" --skip-resident --out "$out/qwen3-50pct" ;;  # beside step 2's file
  8)
    budget=$(( budget / 2 ))
    sizes --shape olmoe-1b-7b --cache 0.1,0.25,0.5 "${three[@]}"
    sizes --shape deepseek-v2-lite --cache 0.1,0.25,0.5 "${three[@]}"
    ;;
  9) sizes --shape qwen3-30b-a3b --cache 0.1 --policies on-demand,presched --tokens 16 --skip-resident --out "$out/qwen3-10pct" ;;
  10) sizes --shape glm-4.5-air --cache 0.1,0.25 "${three[@]}" --skip-resident ;;
  11)
    budget=$(( budget / 2 ))
    sizes --shape gpt-oss-20b --cache 0.1,0.25 "${three[@]}" --skip-resident
    sizes --shape gpt-oss-20b --cache 0.25 "${three[@]}" --skip-resident --quantize-experts mxfp4
    ;;
  12) sizes --shape minimax-m2 --cache 0.1,0.25 "${three[@]}" --skip-resident ;;
  13) sizes --shape qwen3-next-80b-a3b --cache 0.1,0.25 "${three[@]}" --skip-resident ;;
  14) sizes --shape qwen3.5-35b-a3b --cache 0.1,0.25 "${three[@]}" --skip-resident ;;
  *) echo "error: bench/gpu_suite.sh: unknown step '$step' (1-14)" >&2; exit 2 ;;
esac
ls -l "$out"
