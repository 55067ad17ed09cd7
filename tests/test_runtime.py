"""RUNTIME: the collectives (one process and 2 gloo ranks), the TTT work queue, compilation helpers,
the rank-0 logger and the environment report."""
import os

import pytest
import torch
import torch.distributed as dist

import train_gpt as tg
from tests.evalkit import run_two_ranks


def test_one_process_collectives_are_identities():
    assert not dist.is_initialized() and tg._world() == (0, 1)
    assert tg.reduce_over_ranks(1.5, 2.0, device=torch.device("cpu")) == [1.5, 2.0]
    assert tg.any_rank(True, torch.device("cpu")) is True and tg.any_rank(False, torch.device("cpu")) is False
    queue = tg.WorkQueue("test")
    assert [queue.claim() for _ in range(3)] == [0, 1, 2]


def _collectives_on_rank():
    rank, world = tg._world()
    mean = torch.tensor([1.0, 3.0]) * (rank + 1)
    tg.all_reduce_avg(mean).wait()
    shard = torch.empty(2, 3)
    tg.reduce_scatter_avg(shard, torch.arange(12.0).view(4, 3) * (rank + 1)).wait()
    gathered = torch.empty(4, 2)
    tg.all_gather_into(gathered, torch.full((2, 2), float(rank))).wait()
    sums = tg.reduce_over_ranks(float(rank), 1.0, device=torch.device("cpu"))
    anyone = tg.any_rank(rank == 1, torch.device("cpu"))
    queue = tg.WorkQueue("runtime_test")
    claimed = []
    while (i := queue.claim()) < 6:
        claimed.append(i)
    return dict(world=world, mean=mean, shard=shard, gathered=gathered, sums=sums, anyone=anyone, claimed=claimed)


def test_two_rank_collectives_on_gloo():
    results = run_two_ranks(_collectives_on_rank)
    full = torch.arange(12.0).view(4, 3) * 1.5  # mean of x1 and x2
    for rank, r in enumerate(results):
        assert r["world"] == 2
        assert torch.equal(r["mean"], torch.tensor([1.5, 4.5]))
        assert torch.allclose(r["shard"], full[2 * rank:2 * rank + 2])
        assert torch.equal(r["gathered"], torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
        assert r["sums"] == [1.0, 2.0] and r["anyone"] is True
    # the queue hands every index to exactly one rank
    assert sorted(results[0]["claimed"] + results[1]["claimed"]) == list(range(6))


def test_compile_helpers_leave_cpu_code_eager():
    def fn(x):
        return x + 1

    assert tg.compile_for(torch.device("cpu"), fn) is fn
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    tg.mark_cu_dynamic(cu)  # a no-op off CUDA
    assert cu.tolist() == [0, 3, 8]


def test_logger_writes_rank_zero_only(tmp_path, capsys):
    path = tmp_path / "new" / "train.log"
    log = tg.Logger(str(path))
    log("held")
    assert not os.path.exists(path.parent)  # nothing is written before open()
    log.open()
    log("shown")
    log("file only", console=False)
    quiet = tg.Logger(str(tmp_path / "other" / "train.log"), enabled=False)
    quiet("never")
    quiet.open()
    assert path.read_text() == "held\nshown\nfile only\n"
    assert capsys.readouterr().out == "held\nshown\n"
    assert not os.path.exists(tmp_path / "other")


def test_logger_open_names_an_unwritable_folder(tmp_path):
    (tmp_path / "file").write_text("")
    log = tg.Logger(str(tmp_path / "file" / "run" / "train.log"))
    with pytest.raises(tg.ConfigError, match="ARTIFACT_DIR"):
        log.open()


def test_environment_report_names_versions():
    report = tg.environment_report()
    assert f"torch {torch.__version__}" in report and "python" in report
    if not torch.cuda.is_available():
        assert "no CUDA device" in report
