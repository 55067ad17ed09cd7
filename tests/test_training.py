"""TRAINING: the schedule (LR warmdown, Muon momentum warmup, when looping starts), the honest
compile warmup that restores every piece of state, and the wall-clock stop of the training loop."""
import copy
import math
import random
import time

import numpy as np
import pytest
import torch

import train_gpt as tg
from tests.evalkit import one_thread  # noqa: F401  (autouse: one CPU thread for predictable steps)


def test_lr_multiplier_schedule():
    h = tg.Hyperparameters(env={"MIN_LR": "0"})  # without the floor (the default 0.1: PR #1787)
    assert h.warmdown_frac == 0.72 and tg.Hyperparameters(env={}).min_lr == 0.1
    for frac in (0.0, 0.1, 0.279):
        assert tg.lr_multiplier(frac, h) == 1.0
    for frac in (0.28, 0.4, 0.64, 0.9, 1.0):
        assert tg.lr_multiplier(frac, h) == pytest.approx((1 - frac) / 0.72)
    assert tg.lr_multiplier(0.64, h) == pytest.approx(0.5)
    assert tg.lr_multiplier(1.0, h) == 0.0 and tg.lr_multiplier(1.2, h) == 0.0  # never negative
    # continuous where the warmdown starts, monotone after
    values = [tg.lr_multiplier(f / 1000, h) for f in range(1001)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert max(abs(a - b) for a, b in zip(values, values[1:])) < 0.002
    h = tg.Hyperparameters(env={"MIN_LR": "0.1", "WARMDOWN_FRAC": "0.5"})
    assert tg.lr_multiplier(0.49, h) == 1.0
    assert tg.lr_multiplier(0.7, h) == pytest.approx(0.6)
    assert tg.lr_multiplier(0.97, h) == pytest.approx(0.1) and tg.lr_multiplier(1.0, h) == pytest.approx(0.1)


def test_muon_momentum_warmup():
    h = tg.Hyperparameters(env={})
    assert tg.muon_momentum_at(0, h) == pytest.approx(0.92)
    assert tg.muon_momentum_at(750, h) == pytest.approx(0.945)
    assert tg.muon_momentum_at(1500, h) == pytest.approx(0.97)
    assert tg.muon_momentum_at(5000, h) == pytest.approx(0.97)
    values = [tg.muon_momentum_at(s, h) for s in range(0, 1600, 10)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert tg.muon_momentum_at(3, tg.Hyperparameters(env={"MUON_MOMENTUM_WARMUP_STEPS": "0"})) == pytest.approx(0.97)


def _quiet(*args, **kwargs):
    pass


def test_warm_up_restores_the_initial_state(make_hparams):
    # 8 micro-steps of one 32-token row per step: short, and the warmup's cu_seqlens of 64 and 128
    # boundaries then also hold many zero-length segments
    h = make_hparams(WARMUP_STEPS=4, TRAIN_SEQ_LEN=32, TRAIN_BATCH_TOKENS=256, EMA_SELECT_DIVISORS="30")
    assert h.grad_accum_steps == 8 and h.local_batch_tokens == 32
    torch.manual_seed(h.seed)
    device = torch.device("cpu")
    model = tg.build_model(h, device)
    trainer = tg.Trainer(h, model, model, device, _quiet)
    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(trainer.opt.state_dict())
    ema_state = trainer.ema.state_dict()
    fresh = trainer.new_loader()
    first = [fresh.next_batch() for _ in range(3)]
    fresh.close()

    seen = []
    step = trainer.step

    def counting_step(*args, **kwargs):
        loss = step(*args, **kwargs)
        seen.append((model.looping, not torch.equal(model.qo_bank, model_state["qo_bank"]), trainer.ema.steps))
        return loss

    trainer.step = counting_step
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    rng_before = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    trainer.warm_up()
    # the random generators continue as if no warmup had run
    assert (random.random(), np.random.rand()) == rng_before[:2] and torch.equal(torch.rand(1), rng_before[2])
    assert [s[0] for s in seen] == [False, False, True, True]
    assert all(s[1] for s in seen) and seen[-1][2] == 4  # it did train (and averaged) during the warmup

    assert model.looping is False
    state = model.state_dict()
    assert list(state) == list(model_state)
    for name, t in model_state.items():
        assert state[name].dtype == t.dtype and torch.equal(state[name], t), name
    for opt, saved in zip(trainer.opt.all, opt_state):
        assert len(opt.state) == 0  # no momentum / Adam moments survive
        now = opt.state_dict()
        assert now["state"] == {} and now["param_groups"] == saved["param_groups"]
    assert list(trainer.averages) == ["ema", "ema30"]
    for ema in trainer.averages.values():  # every average, the extra one too
        assert ema.steps == 0 and ema.init_weight == 1.0
        for name, s in ema.shadow.items():
            assert torch.equal(s, ema_state["shadow"][name]), name
    for want in first:  # the data restarts where a fresh run starts
        got = trainer.loader.next_batch()
        assert all(torch.equal(a, b) for a, b in zip(got[:3], want[:3])) and got[3] == want[3]
    trainer.loader.close()


def test_train_logs_a_line_at_least_every_train_log_seconds(make_hparams):
    """Steps 1-5, every TRAIN_LOG_EVERY-th step, and a line whenever TRAIN_LOG_SECONDS of training
    time have passed since the last: a short run on one GPU still shows its loss and ETA."""
    def lines(**env):
        h = make_hparams(MAX_WALLCLOCK_SECONDS=0, ITERATIONS=14, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=100_000,
                         TRAIN_SEQ_LEN=32, TRAIN_BATCH_TOKENS=256, EMA_SELECT=0, **env)
        model = tg.build_model(h, torch.device("cpu"))
        out = []
        trainer = tg.Trainer(h, model, model, torch.device("cpu"), out.append)

        def slow_step(step, frac, *args, **kwargs):
            time.sleep(0.03)
            return 1.0

        trainer.step = slow_step
        trainer.train(lambda step: (1.0, 1.0))
        return [int(line.split()[0].split(":")[1].split("/")[0]) for line in out if "train_loss:" in line]

    assert lines(TRAIN_LOG_SECONDS=0) == [1, 2, 3, 4, 5]
    timed = lines(TRAIN_LOG_SECONDS=0.085)  # every third 30 ms step, give or take the sleep's slack
    assert timed[:5] == [1, 2, 3, 4, 5] and len(timed) >= 7 and timed[-1] >= 11, timed
    assert all(b - a >= 2 for a, b in zip(timed[4:], timed[5:])), timed


def test_train_lowers_the_loss_and_stops_on_the_wallclock(make_hparams):
    budget_s = 3.0
    h = make_hparams(MAX_WALLCLOCK_SECONDS=budget_s, GPTQ_RESERVE_SECONDS=0, ITERATIONS=100_000, VAL_LOSS_EVERY=100_000,
                     VAL_AT_START=1, TRAIN_LOG_EVERY=100_000, TRAIN_SEQ_LEN=32, TRAIN_BATCH_TOKENS=256)
    torch.manual_seed(h.seed)
    device = torch.device("cpu")
    model = tg.build_model(h, device)
    trainer = tg.Trainer(h, model, model, device, _quiet)
    val = tg.load_validation_tokens(h.val_files, 64)[:513]
    cu = torch.from_numpy(tg.build_cu_seqlens(val[:-1].numpy(), 64)[0])
    validated = []

    def validate(step):
        model.eval()
        with torch.no_grad():
            loss = model(val[:-1], val[1:], cu, 64).mean().item()
        model.train()
        validated.append((step, loss))
        return loss, loss

    step_ms = []
    step = trainer.step

    def timed_step(*args, **kwargs):
        t0 = time.perf_counter()
        loss = step(*args, **kwargs)
        step_ms.append((time.perf_counter() - t0) * 1000)
        return loss

    trainer.step = timed_step
    stats = trainer.train(validate)
    budget_ms = budget_s * 1000
    info = (stats, step_ms, validated)
    assert stats["steps"] == len(step_ms) and 3 <= stats["steps"] < h.iterations, info
    assert [s for s, _ in validated] == [0, stats["steps"]]
    # it stops at the first check after the budget is spent: within budget + one step
    assert budget_ms <= stats["train_ms"] <= budget_ms + max(step_ms) + 1, info
    assert stats["train_ms"] - step_ms[-1] < budget_ms, info
    assert abs(stats["train_ms"] - sum(step_ms)) < 0.05 * budget_ms, info  # validation time is not counted
    assert stats["looping_at_step"] is not None and stats["looping_at_step"] > 0, info  # at 35% of the budget
    first, last = validated[0][1], validated[-1][1]
    assert abs(first - math.log(h.vocab_size)) < 0.1, info
    assert last < first - 0.3, info


def test_looping_starts_at_its_fraction_of_the_budget():
    h = tg.Hyperparameters(env={})
    assert h.enable_looping_at == 0.35 and h.num_loops == 2
    assert not tg.looping_at(0.3499, h) and tg.looping_at(0.35, h) and tg.looping_at(1.0, h)
    assert not tg.looping_at(1.0, tg.Hyperparameters(env={"NUM_LOOPS": "0"}))


def test_rng_state_round_trip():
    state = tg.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    tg.set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_val_loss_every_0_validates_only_at_the_end(make_hparams):
    h = make_hparams(ITERATIONS=2, VAL_LOSS_EVERY=0, TRAIN_SEQ_LEN=32, TRAIN_BATCH_TOKENS=256)
    model = tg.build_model(h, torch.device("cpu"))
    trainer = tg.Trainer(h, model, model, torch.device("cpu"), _quiet)
    validated = []
    stats = trainer.train(lambda step: validated.append(step) or (1.0, 1.0))
    assert validated == [2] and stats["steps"] == 2


def test_step_0_is_validated_only_with_val_at_start(make_hparams):
    """VAL_LOSS_EVERY=2 over 4 steps: steps 2 and 4 by default; step 0 too with VAL_AT_START=1."""
    for at_start, expected in ((0, [2, 4]), (1, [0, 2, 4])):
        h = make_hparams(ITERATIONS=4, VAL_LOSS_EVERY=2, VAL_AT_START=at_start, TRAIN_SEQ_LEN=32,
                         TRAIN_BATCH_TOKENS=256)
        model = tg.build_model(h, torch.device("cpu"))
        trainer = tg.Trainer(h, model, model, torch.device("cpu"), _quiet)
        validated = []
        trainer.train(lambda step: validated.append(step) or (1.0, 1.0))
        assert validated == expected


def test_late_qat_turns_on_once_at_its_step_and_the_warmup_leaves_it_off(make_hparams):
    """QAT_AT=0.5 of ITERATIONS=4: steps 0 and 1 train on float weights, steps 2 and 3 on the grid;
    one log line says where; the compile warmup (frac 0) never turns the gate on."""
    h = make_hparams(ITERATIONS=4, VAL_LOSS_EVERY=0, TRAIN_SEQ_LEN=32, TRAIN_BATCH_TOKENS=256, QAT_AT=0.5,
                     WARMUP_STEPS=2)
    model = tg.build_model(h, torch.device("cpu"))
    lines, gates = [], []
    trainer = tg.Trainer(h, model, model, torch.device("cpu"), lines.append)
    trainer.warm_up()
    assert float(model.qat) == 0
    step = trainer.step
    trainer.step = lambda *args, **kwargs: gates.append(float(model.qat)) or step(*args, **kwargs)
    stats = trainer.train(lambda step: (1.0, 1.0))
    assert gates == [0.0, 0.0, 1.0, 1.0] and stats["qat_at_step"] == 2
    assert float(model.qat) == 0  # off again once training ends
    assert [line for line in lines if line.startswith("qat:")] == ["qat:on step:2 (training forwards see the "
                                                                   "matrices on their int6 grid)"]


def test_ema_select_keeps_whichever_weights_score_lower_on_unseen_training_batches(make_hparams):
    """EMA_SELECT=k: after training, live and EMA weights are scored on the k micro-batches the
    loader holds out of every pass (data training never used, never validation); the better stays."""
    h = make_hparams(ITERATIONS=3, VAL_LOSS_EVERY=0, TRAIN_SEQ_LEN=32, TRAIN_BATCH_TOKENS=256, EMA_SELECT=2)
    model = tg.build_model(h, torch.device("cpu"))
    trainer = tg.Trainer(h, model, model, torch.device("cpu"), _quiet)
    trainer.train(lambda step: (1.0, 1.0))
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = trainer.ema.averaged()
    choice = trainer.finish_with_better_average()
    assert choice["kept"] == ("live" if choice["live_loss"] < choice["ema_loss"] else "ema")
    kept = live if choice["kept"] == "live" else ema
    assert all(torch.equal(p.detach(), kept[n].to(p.dtype)) for n, p in model.named_parameters())
    assert model.training
    # a deliberately bad average is never kept
    g = torch.Generator().manual_seed(0)
    trainer.ema.shadow = {n: 3 * torch.randn(s.shape, generator=g) * (1 - trainer.ema.init_weight)
                          for n, s in trainer.ema.shadow.items()}  # an "average" of random weights
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(live[n])
    assert trainer.finish_with_better_average()["kept"] == "live"
    assert all(torch.equal(p.detach(), live[n]) for n, p in model.named_parameters())


def test_ema_select_divisors_add_averages_to_the_choice(make_hparams):
    """EMA_SELECT_DIVISORS=30,100: two more averages, each with its own window, updated every step
    and scored with live and the main EMA on the held-out batches; the lowest loss is kept."""
    h = make_hparams(ITERATIONS=4, VAL_LOSS_EVERY=0, TRAIN_SEQ_LEN=32, TRAIN_BATCH_TOKENS=256, EMA_SELECT=2,
                     EMA_SELECT_DIVISORS="30,100")
    model = tg.build_model(h, torch.device("cpu"))
    trainer = tg.Trainer(h, model, model, torch.device("cpu"), _quiet)
    assert list(trainer.averages) == ["ema", "ema30", "ema100"] and trainer.averages["ema"] is trainer.ema
    assert trainer.averages["ema30"].decay_at(3) == pytest.approx(4 / 34)
    trainer.train(lambda step: (1.0, 1.0))
    averages = {name: e.averaged() for name, e in trainer.averages.items()}
    assert all(e.steps == 4 for e in trainer.averages.values())
    assert not torch.equal(averages["ema30"]["qo_bank"], averages["ema"]["qo_bank"])  # other windows
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    choice = trainer.finish_with_better_average()
    assert list(choice["losses"]) == ["live", "ema", "ema30", "ema100"]
    assert choice["kept"] == min(choice["losses"], key=choice["losses"].get)
    kept = live if choice["kept"] == "live" else averages[choice["kept"]]
    assert all(torch.equal(p.detach(), kept[n].to(p.dtype)) for n, p in model.named_parameters())


@pytest.mark.parametrize("env, says", [({"EMA_SELECT_DIVISORS": "30,x"}, "separated by commas"),
                                       ({"EMA_SELECT_DIVISORS": "30,0"}, "must be > 0"),
                                       ({"EMA_SELECT_DIVISORS": "30", "EMA_SELECT": "0"}, "set EMA_SELECT>0")])
def test_bad_ema_select_divisors_are_refused(env, says):
    with pytest.raises(tg.ConfigError, match=says):
        tg.Hyperparameters(env=env)


def test_ema_select_divisors_default_and_off():
    """The default adds the windows 30 and 100; "none" keeps only live and the EMA; EMA_SELECT=0 (the
    record's settings) builds no extra average, since nothing would choose among them."""
    assert tg.Hyperparameters(env={}).ema_select_divisors == (30.0, 100.0)
    assert tg.Hyperparameters(env={"EMA_SELECT_DIVISORS": "none"}).ema_select_divisors == ()
    assert tg.Hyperparameters(env={"EMA_SELECT": "0"}).ema_select_divisors == ()
    assert tg.Hyperparameters(env={"EMA_SELECT": "0", "EMA_SELECT_DIVISORS": "none"}).ema_select_divisors == ()


def test_training_with_ema_select_off_holds_nothing_out_and_finishes(make_hparams):
    """EMA_SELECT=0 (the record's settings): training ends normally with no held-out batches. It
    once raised a TypeError there, after the whole run and before its checkpoint was saved."""
    h = make_hparams(ITERATIONS=2, VAL_LOSS_EVERY=0, TRAIN_SEQ_LEN=32, TRAIN_BATCH_TOKENS=256, EMA_SELECT=0)
    model = tg.build_model(h, torch.device("cpu"))
    trainer = tg.Trainer(h, model, model, torch.device("cpu"), _quiet)
    assert trainer.train(lambda step: (1.0, 1.0))["steps"] == 2 and trainer.held_out == []


# ---------------------------------------------------------------------------------------------
# Progressive training context (TRAIN_SEQ_SCHEDULE)
# ---------------------------------------------------------------------------------------------


def test_train_seq_schedule_stages_and_lengths():
    h = tg.Hyperparameters(env={"TRAIN_SEQ_SCHEDULE": "1024@0.1, 2048@0.7,3072@1", "TRAIN_SEQ_LEN": "3072"})
    h.check()
    assert h.train_seq_stages == [(1024, 0.1), (2048, 0.7), (3072, 1.0)]
    assert [tg.train_seq_len_at(f, h) for f in (0, 0.0999, 0.1, 0.69, 0.7, 0.99, 1.0)] == \
        [1024, 1024, 2048, 2048, 3072, 3072, 3072]
    # looping switches on at 0.35, inside the 2048 stage: four graphs, in the order training meets them
    assert tg.compile_variants(h) == [(False, 1024), (False, 2048), (True, 2048), (True, 3072)]
    plain = tg.Hyperparameters(env={})
    assert plain.train_seq_stages == [(2048, 1.0)] and tg.train_seq_len_at(0.5, plain) == 2048
    assert tg.compile_variants(plain) == [(False, 2048), (True, 2048)]


@pytest.mark.parametrize("schedule, seq_len, message", [
    ("1024@0.5,2048", "2048", "LEN@END"),
    ("1024@0.5,2048@0.4,3072@1", "3072", "rise to exactly 1"),
    ("1024@0.5,2048@0.9", "2048", "rise to exactly 1"),
    ("0@0.5,2048@1", "2048", "positive"),
    ("1024@0.5,2048@1", "4096", "longest length must be TRAIN_SEQ_LEN=4096"),
])
def test_train_seq_schedule_rejects(schedule, seq_len, message):
    with pytest.raises(tg.ConfigError, match=message):
        tg.Hyperparameters(env={"TRAIN_SEQ_SCHEDULE": schedule, "TRAIN_SEQ_LEN": seq_len}).check()


def test_seq_change_ramp():
    h = tg.Hyperparameters(env={"SEQ_CHANGE_WARMUP_STEPS": "4"})
    assert [tg.seq_change_ramp(k, True, h) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert tg.seq_change_ramp(0, False, h) == 1.0  # the first stage is not a change
    assert tg.seq_change_ramp(0, True, tg.Hyperparameters(env={})) == 1.0  # off by default


def test_progressive_context_warm_up_and_training(make_hparams):
    # 64-token segments until 30% of training, then 128; looping at 35%: three graphs to warm up
    h = make_hparams(WARMUP_STEPS=3, ITERATIONS=5, VAL_LOSS_EVERY=0, TRAIN_SEQ_LEN=128, TRAIN_BATCH_TOKENS=1024,
                     TRAIN_SEQ_SCHEDULE="64@0.3,128@1", SEQ_CHANGE_WARMUP_STEPS=2)
    assert tg.compile_variants(h) == [(False, 64), (False, 128), (True, 128)]
    torch.manual_seed(h.seed)
    model = tg.build_model(h, torch.device("cpu"))
    lines, calls = [], []
    trainer = tg.Trainer(h, model, model, torch.device("cpu"), lines.append)
    model_fn = trainer.model_fn

    def spy(x, y, cu, max_seqlen):
        segments = np.diff(cu.numpy())
        calls.append((model.looping, max_seqlen, int(segments.max())))
        return model_fn(x, y, cu, max_seqlen)

    trainer.model_fn = spy
    lr_seen = []
    set_schedule = trainer.opt.set_schedule
    trainer.opt.set_schedule = lambda lr, *rest: lr_seen.append(lr) or set_schedule(lr, *rest)
    trainer.warm_up()
    warm = calls[:]
    assert [c[:2] for c in warm[::h.grad_accum_steps]] == [(False, 64), (False, 128), (True, 128)]
    assert all(longest <= max_seqlen for _, max_seqlen, longest in warm)  # no segment is longer than it says
    assert trainer.seq_len == 64 and trainer.seq_changed_at == 0  # restored
    calls.clear()
    lr_seen.clear()
    stats = trainer.train(lambda step: (1.0, 1.0))
    assert stats["steps"] == 5
    per_step = [c[1] for c in calls[::h.grad_accum_steps]]
    assert per_step == [64, 64, 128, 128, 128]  # steps 0 and 1 have frac < 0.3
    assert all(longest <= max_seqlen for _, max_seqlen, longest in calls)
    assert any("seq_len:128 step:2 (was 64)" in line for line in lines)
    ramp = [tg.lr_multiplier(s / 5, h) for s in range(5)]
    ramp[2] *= 0.5  # the first step after the change; the second is at the full rate again
    assert lr_seen == pytest.approx(ramp)
