#!/bin/bash
# usage: ab_runs.sh ITERATIONS SEED NAME[:VAR=VALUE,...]... -- step-based A/B runs of train_gpt.py side by
# side on one GPU (DEVELOPERS.md, "Quality A/B": the schedule counts steps, so sharing the GPU changes no
# number; three default-sized runs fit an H200), each stopped after its pre-quantization score, which
# is all an A/B needs (GPTQ of one checkpoint is tools/quant_sweep.py's job). Runs in the foreground:
# start it from a detached driver. Writes a line per event to /root/res/stages.txt.
#   ab_runs.sh 270 0 base "nosmear:SMEAR_GATE=0" "gate:ATTN_OUT_GATE=1,SPARSE_ATTN_GATE=0"
# names the runs base_s0, nosmear_s0, gate_s0 (console /root/runs/NAME.out, log /root/runs/NAME/train.log).
set -u
ITER=$1; SEED=$2; shift 2
mkdir -p /root/res
stage() { echo "$(date +%H:%M:%S) $1" >> /root/res/stages.txt; }
A="ITERATIONS=$ITER MAX_WALLCLOCK_SECONDS=0 TRAIN_LOG_EVERY=1 TTT_ENABLED=0 WARMUP_STEPS=4 VAL_LOSS_EVERY=0 SEED=$SEED"
names=()
for spec in "$@"; do
  name=${spec%%:*}_s$SEED; env_=""; [[ $spec == *:* ]] && env_=${spec#*:}
  bash tools/device/start_run.sh $name 1 $A ${env_//,/ } >> /root/res/ab_start.txt 2>&1
  names+=($name)
done
stage "ab started: ${names[*]}"
for n in "${names[@]}"; do
  while kill -0 "$(cat /root/runs/$n.pid)" 2>/dev/null && ! grep -q prequant /root/runs/$n.out; do sleep 5; done
  pkill -f "[s]nap/$n/train_gpt"; stage "done $n"
done
sleep 3  # the killed runs release the GPU
