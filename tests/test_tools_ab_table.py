"""tools/ab_table.py: the A/B table from console logs, and one line for a file that is not one."""
from tools import ab_table

LOG = """run_id:{name} artifact_dir:/root/runs/{name} world_size:1 grad_accum:8
settings that differ from the defaults: DATA_DIR='/root/data' (default './data/'), SEED=0 (default 1337), \
ITERATIONS=4 (default 20000), TRAIN_SEQ_SCHEDULE='1024@0.5,2048@1' (default ''){extra}
step:1/4 train_loss:9.0000 lr_mult:1.000 ms/step:1.0 tok/s:1 elapsed:0.1s eta:1s
step:2/4 train_loss:{l2} lr_mult:1.000 ms/step:1.0 tok/s:1 elapsed:0.1s eta:1s
step:4/4 train_loss:{l4} lr_mult:1.000 ms/step:1.0 tok/s:1 elapsed:0.1s eta:1s
train_done steps:4 train_time:1.0s peak_memory:1MiB live_val_bpb:{live}
{select}prequant ({weights} weights) val_loss:2.00000 val_bpb:{pre}
"""


def write(tmp_path, name, **kw):
    path = tmp_path / f"{name}.console.txt"
    path.write_text(LOG.format(name=name, **kw))
    return str(path)


def test_the_table_has_each_run_its_delta_and_what_it_kept(tmp_path, capsys):
    a = write(tmp_path, "base", extra="", l2="5.0000", l4="4.0000", live="1.20000", select="", weights="EMA",
              pre="1.21000")
    b = write(tmp_path, "b1", extra=", SMEAR_GATE=1 (default 0)", l2="4.5000", l4="3.5000", live="1.15000",
              select="ema_select on 4 unseen training micro-batches: live loss 1.0, EMA loss 1.1, ema30 loss 1.05: "
                     "kept the live weights\n",
              weights="live", pre="1.15000")
    assert ab_table.main([a, b, "--steps", "2"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].startswith("| run | loss @2 | loss @4 | live val_bpb | Δ live |")
    assert rows[2].startswith("| base | 5.0000 | 4.0000 | 1.20000 | +0.00000 | EMA: 1.21000 |")
    assert "| b1 | 4.5000 | 3.5000 | 1.15000 | -0.05000 | live: 1.15000 | live 1.00000, EMA 1.10000, ema30 1.05000 |" in rows[3]
    assert "| EMA: 1.21000 | — |" in rows[2]  # no EMA_SELECT line: no held-out losses
    assert "SMEAR_GATE=1" in rows[3] and "TRAIN_SEQ_SCHEDULE='1024@0.5,2048@1'" in rows[3]
    assert "DATA_DIR" not in rows[3] and "ITERATIONS" not in rows[3]  # the A/B's own settings


def test_a_file_that_is_not_a_log_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    assert ab_table.main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "notes.txt" in err
