#!/bin/bash
# usage: pipeline.sh NAME [ENV=VALUE...] -- starts, detached, one 1-GPU chain on this machine:
#   1. train_gpt.py with ENV (TTT_ENABLED=0 unless ENV says otherwise): its final_model.pt and
#      final_model.int6.ptz stay in /root/runs/NAME/;
#   2. tools/quant_sweep.py --sensitivity on that final_model.pt (the README's quantization rows);
#   3. tools/ttt_sweep.py on that artifact over the 300-document sample (VAL_DOC_FRACTION=0.15 SEED=0).
# The same ENV reaches every stage (the model's shape must match). Logs: /root/runs/NAME.out (the
# run), NAME.quant.out, NAME.ttt.out, results NAME/quant.json and NAME/ttt.json; NAME.stages has a
# line per stage and "pipeline_done" last; NAME.pid is the chain's, so poll_pipeline.sh stops when it
# has ended for any reason. A stage that fails ends the chain. The chain runs on its own copy of the
# code (/root/snap/NAME), so a later call's working tree changes nothing. Needs the full corpus
# carried (.carry/debian_docs.jsonl.xz and the tokenizer), never .carry/valdata alone.
set -u
NAME=$1; shift
source tools/device/setup.sh
if [ ! -f /root/data/datasets/fineweb10B_sp8192/fineweb_val_000000.bin ]; then
  echo "pipeline: error: no corpus in /root/data: carry .carry/debian_docs.jsonl.xz and .carry/fineweb_8192_bpe.model"
  exit 2
fi
S=/root/snap/$NAME; R=/root/runs/$NAME
rm -rf $S && mkdir -p $S $R && cp -r train_gpt.py tools data $S/
cat > $S/chain.sh <<CHAIN
set -u; cd $S; export DATA_DIR=/root/data ARTIFACT_DIR=$R RUN_ID=$NAME TTT_ENABLED=0 $*
stage() { echo "\$(date +%H:%M:%S) \$1" >> /root/runs/$NAME.stages; }
stage train; python3 train_gpt.py > /root/runs/$NAME.out 2>&1 || { stage "train failed"; exit 1; }
stage quant_sweep
python3 tools/quant_sweep.py $R/final_model.pt --sensitivity --out-dir $R/quant --out $R/quant.json > /root/runs/$NAME.quant.out 2>&1 \
  || { stage "quant_sweep failed"; exit 1; }
stage ttt_sweep
VAL_DOC_FRACTION=0.15 SEED=0 python3 tools/ttt_sweep.py $R/final_model.int6.ptz --out-dir $R/ttt --out $R/ttt.json \
  > /root/runs/$NAME.ttt.out 2>&1 || { stage "ttt_sweep failed"; exit 1; }
stage pipeline_done
CHAIN
: > /root/runs/$NAME.stages
setsid nohup bash $S/chain.sh < /dev/null > /root/runs/$NAME.chain.out 2>&1 &
echo $! > /root/runs/$NAME.pid
echo "started chain $NAME: $*"
