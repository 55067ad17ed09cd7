"""tools/gloo_shutdown_check.py on this checkout's train_gpt.py: a finished 2-process gloo torchrun
run exits 0, even with a collective still in flight when the process group is destroyed (--stress:
the case that aborted at interpreter exit while torch.distributed.nn's defaults held the group)."""
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_a_finished_two_process_cpu_run_exits_0():
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "gloo_shutdown_check.py"),
                           os.path.join(REPO_ROOT, "train_gpt.py"), "--runs", "1", "--stress"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "exit codes: 0 (0 of 1 failed)" in proc.stdout
