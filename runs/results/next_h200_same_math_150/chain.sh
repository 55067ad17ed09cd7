#!/bin/bash
# Detached driver for #15's "same math" point (b): the current code with the record's settings
# (README, "Techniques beyond the record"), ITERATIONS=150 at SEED=0 and 1 side by side, to set
# against the curves #15 gives for the code it was filed on (train loss 3.9212 / 2.9364 / 2.4828 at
# steps 50 / 100 / 150 and live val_bpb 1.35240 at seed 0; 3.9224 / 2.9769 / 2.5323, 1.38240 at
# seed 1; the two-seed means must agree within 0.015). Step-based, so sharing the GPU changes no
# number. Each stopped after its prequant line.
set -u
mkdir -p /root/res; cd "$(dirname "$0")/../../.."
stage() { echo "$(date +%H:%M:%S) $1" >> /root/res/stages.txt; }
A="ITERATIONS=150 MAX_WALLCLOCK_SECONDS=0 TRAIN_LOG_EVERY=1 TTT_ENABLED=0"
OLD="SMEAR_GATE=0 SPARSE_ATTN_GATE=0 QK_GAIN_INIT=5.0 MIN_LR=0 MATRIX_LR=0.022 MUON_POLAR_EXPRESS=0 MUON_WD_TAPER_AT=0 EMA_SELECT=0"
stage start
for s in 0 1; do bash tools/device/start_run.sh rec_s$s 1 $A $OLD SEED=$s > /root/res/rec_s$s.start.txt 2>&1; done
for n in rec_s0 rec_s1; do
  while kill -0 "$(cat /root/runs/$n.pid)" 2>/dev/null && ! grep -q prequant /root/runs/$n.out; do sleep 5; done
  pkill -f "[s]nap/$n/train_gpt"; cp /root/runs/$n.out /root/res/$n.console.txt
done
stage "chain done"
