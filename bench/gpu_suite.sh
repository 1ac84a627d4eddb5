#!/usr/bin/env bash
# The accelerator measurements, prepared to fit ~10 minutes of one H100/H200 (CIFAR-10
# model, bfloat16). Run from the repository root; JSON lines go to $OUT (default
# bench/results/gpu.jsonl). Each line names the device; nothing is asserted.
#
#   bash bench/gpu_suite.sh [OUT]
#
# 1. train steps/s, MFU and peak memory at global batch 128 (median of 50 steps);
# 2. 256 samples with 1000 ancestral steps (seconds; scan overhead vs one forward pass);
# 3. 256 samples with DPM-Solver++ 2M at 20 network evaluations (images/s);
# 4. the settings that may pay there: steps_per_call 4 and 8, explicit attention, remat;
# 5. the cost of the paper configs' per-replica clipping (8 replicas on one device, vmap):
#    against global clipping and against running the replicas in a scan.
set -euo pipefail
OUT="${1:-bench/results/gpu.jsonl}"
CFG=(--config=configs/cifar10.py --config.model.dtype=bfloat16 --config.training.batch_size=128)
train() { timeout 300 python -m bench.bench_train "${CFG[@]}" --steps=50 --warmup=5 --out="$OUT" "$@" || echo "failed: $*" >&2; }

train
timeout 300 python -m bench.bench_sampler --config=configs/cifar10.py \
    --config.model.dtype=bfloat16 --config.sampling.batch_size=256 --methods=ancestral \
    --repeats=2 --out="$OUT" || echo "failed: sampler" >&2
timeout 120 python -m bench.bench_sampler --config=configs/cifar10.py \
    --config.model.dtype=bfloat16 --config.sampling.batch_size=256 --methods=dpm_solver \
    --config.sampling.dpm_solver.num_steps=20 --repeats=3 --out="$OUT" \
    || echo "failed: dpm_solver" >&2
train --config.training.steps_per_call=4
train --config.training.steps_per_call=8
train --config.model.attn_impl=explicit
train --config.model.remat=True
train --config.training.clip_mode=global
train --config.training.replica_loop=scan
