#!/bin/bash
# Device call 1 (fresh machine; #16): the 300-document sample on main (6be6c54) and on branch
# ttt-lora-layout (.carry/lora.py), same artifact, one after the other; then all 2,000 documents
# started detached on the faster of the two (polled by call2.sh).
# carry: .carry/valdata .carry/art60.int6.ptz .carry/lora.py .whl1/brotli-*.whl .whl1/python_minifier-*.whl
set -u
A=$PWD/.carry/art60.int6.ptz
bash tools/device/ttt_sample.sh main $A
SCRIPT=.carry/lora.py bash tools/device/ttt_sample.sh lora $A
t() { grep -oP '^ttt val_.*eval:\K[0-9.]+' /root/runs/$1.out || echo 9999; }
best=$(python3 -c "print('lora' if $(t lora) < $(t main) else 'main')")
echo "sample: main $(t main) s, lora $(t lora) s -> full on $best"
S=train_gpt.py; [ $best = lora ] && S=.carry/lora.py
SCRIPT=$S bash tools/device/start_run.sh full 1 EVAL_ONLY_PATH=$A SEED=0 TTT_ENABLED=1 \
  ARTIFACT_LIMIT_BYTES=16100000 VAL_DOC_FRACTION=1
sleep 20; tail -3 /root/runs/full.out
