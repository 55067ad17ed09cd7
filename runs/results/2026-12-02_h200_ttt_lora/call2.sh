#!/bin/bash
# Device call 2 (same warm machine, right after call1.sh): follows the detached 2,000-document run
# until TTT has scored, copying its console every 5 s.
set -u
for i in $(seq 1 114); do
  sleep 5; cp /root/runs/full.out $OUT/full.console.txt
  grep -q "^ttt val_\|Traceback" /root/runs/full.out && break
done
pkill -f "/root/snap/full/[t]rain_gpt.py"; sleep 1; cp /root/runs/full.out $OUT/full.console.txt
grep -E "ttt_warmup|ttt_graphs|ttt_progress.*batch:(8|16|24|32)/|^ttt |WARN|rror" /root/runs/full.out | tail -10
