#!/bin/bash
# usage: poll.sh SECONDS -- until chain.sh is done (or SECONDS pass, or it has ended); returns $OUT/results.tgz
exec bash tools/device/poll_chain.sh "$1" new_s0 new_s1 old_s1
