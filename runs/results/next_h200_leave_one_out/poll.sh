#!/bin/bash
# usage: poll.sh SECONDS -- until chain.sh is done (or SECONDS pass, or it has ended); returns $OUT/results.tgz
exec bash tools/device/poll_chain.sh "$1" nope_s0 nominlr_s0 notaper_s0 nosparse_s0 qk50_s0 lr022_s0 \
  wd85_s0 b2_99_s0 wd85b2_s0 capneg20_s0 wdmlp05_s0 wdmlp2_s0
