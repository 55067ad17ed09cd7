#!/bin/bash
# usage: collect.sh NAME... -- packs /root/res (a detached driver's results) and each run's console,
# train.log and summary.json into one archive, $OUT/results.tgz: a call returns at most 8 files, and
# $OUT is emptied when the next call starts (it is /root/out on the device), so drivers write to
# /root/res and every polling call packs it again. Unpack here with `tar xzf FILES_AT/results.tgz`.
stage=$(mktemp -d)
[ -d /root/res ] && cp -r /root/res/. $stage/ 2>/dev/null
for n in "$@"; do
  cp /root/runs/$n.out $stage/$n.console.txt 2>/dev/null
  cp /root/runs/$n/train.log $stage/$n.train.log 2>/dev/null
  cp /root/runs/$n/summary.json $stage/$n.summary.json 2>/dev/null
done
tar czf $OUT/results.tgz -C $stage . && rm -rf $stage
