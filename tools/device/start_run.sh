#!/bin/bash
# usage: [SCRIPT=path] start_run.sh NAME NPROC [ENV=VALUE...]  -- installs the carried wheels and builds
# the corpus (each once per machine), then starts a detached run of train_gpt.py (or SCRIPT: another
# version of it, e.g. a branch's, carried in an ignored folder): torchrun with NPROC > 1, python3 with 1.
# Wheels: any of .whl/, .whl1/, .whl2/ carried in this call or an earlier one (copied to /root/whl);
# .whl2 holds the second half of the split FA4 libs wheel (README.md, "FlashAttention 4").
set -u
NAME=$1; NPROC=$2; shift 2
source tools/device/setup.sh
# the run reads its own copy of the script: a later call replaces the working tree
mkdir -p /root/snap/$NAME && cp "${SCRIPT:-train_gpt.py}" /root/snap/$NAME/train_gpt.py
launch=(python3); [ "$NPROC" -gt 1 ] && launch=(torchrun --standalone --nproc_per_node=$NPROC)
setsid nohup env DATA_DIR=/root/data ARTIFACT_DIR=/root/runs/$NAME RUN_ID=$NAME "$@" "${launch[@]}" \
  /root/snap/$NAME/train_gpt.py > /root/runs/$NAME.out 2>&1 < /dev/null &
echo $! > /root/runs/$NAME.pid  # wait loops stop once it is gone: an early one-line error ends a wait
echo "started $NAME: $*"
