#!/bin/bash
# usage: wait_for.sh SECONDS PATTERN NAME... -- this folder's runs were followed by the version of this
# script at commit 5cde501 (poll the console logs for PATTERN, copy them to $OUT); it lives on as
# tools/device/wait_for.sh, which also copies each run's summary.json.
exec bash "$(dirname "$0")/../../../tools/device/wait_for.sh" "$@"
