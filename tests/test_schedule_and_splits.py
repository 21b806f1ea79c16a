"""Dataset splits that cannot give a sample are refused before megatron-core is asked for them
(it would loop forever), and a resume follows Megatron-LM's rules for the learning-rate schedule:
a changed schedule is refused unless --override-opt-param-scheduler or
--use-checkpoint-opt-param-scheduler says which one to use."""
import contextlib
import math
import re
import signal
import socket

import pytest

import test_training_system as system
from megatron_rwkvx.data.datasets import DataConfigError, build_gpt_datasets
from megatron_rwkvx.training.arguments import ArgumentError, parse_args
from megatron_rwkvx.training.schedule import build_scheduler
from test_data_datasets import _Tok, make_dataset

data = system.data  # the module-scoped tokenized corpus of test_training_system, built once here too
MODEL = ["--hidden-size", "64", "--head-size", "16", "--layer-pattern", "RRAR",
         "--sparse-chunk-size", "16", "--sparse-top-k", "2"]


@contextlib.contextmanager
def _deadline(seconds):
    """Fail instead of hanging: megatron-core's epoch count loops in Python, so SIGALRM ends it."""
    def expire(signum, frame):
        raise TimeoutError(f"still building datasets after {seconds} s (megatron-core's endless loop)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """120 documents of 6 to 121 tokens (about 7,500 tokens), like the 120-document demo corpus."""
    d = tmp_path_factory.mktemp("splits")
    return make_dataset(str(d / "docs_text_document"), 120, 11), make_dataset(str(d / "few_text_document"), 30, 12)


def _build(data_path, split, seq, sizes, cache):
    with _deadline(60):
        return build_gpt_datasets(data_path, split, seq, 1234, sizes, str(cache), _Tok())


def test_a_split_without_documents_is_refused_not_built_forever(corpus, tmp_path):
    docs, _ = corpus
    # round(0.999 * 120) = 120: the valid split's range is empty although its share is not.
    with pytest.raises(DataConfigError) as err:
        _build([docs], "999,1,0", 512, [8, 4, 0], tmp_path)
    msg = str(err.value)
    for words in ("valid split", "0 of its 120 documents", "0 tokens", "512 + 1", "--split (now '999,1,0')",
                  "--seq-length", "--eval-iters 0"):
        assert words in msg, msg


def test_a_split_shorter_than_one_sample_is_refused(corpus, tmp_path):
    docs, _ = corpus
    # 2 of 120 documents for validation: fewer tokens than one sample of 512 + 1.
    with pytest.raises(DataConfigError, match=r"valid split .* gets 2 of its 120 documents \(\d+ tokens\), "
                                              r"fewer than one sample of 512 \+ 1 tokens, but 4 samples"):
        _build([docs], "98,2,0", 512, [8, 4, 0], tmp_path)
    # The same split at a sequence length it can serve builds.
    train, valid, test = _build([docs], "98,2,0", 32, [8, 4, 0], tmp_path)
    assert len(train) >= 8 and len(valid) >= 4 and test is None


def test_every_dataset_of_a_blend_is_checked(corpus, tmp_path):
    docs, few = corpus
    # round(0.97 * 30) = 29: the small dataset gives the valid split one document, under 129 tokens.
    for data_path in (["0.5", docs, "0.5", few], [docs, few]):
        with pytest.raises(DataConfigError, match=f"valid split of dataset '{few}' gets 1 of its 30 documents"):
            _build(data_path, "97,3,0", 128, [8, 4, 0], tmp_path)
    with pytest.raises(DataConfigError, match="weight 0"):
        _build(["1", docs, "0", few], "90,10,0", 32, [8, 4, 0], tmp_path)


def test_a_split_nobody_reads_does_not_stop_the_build(corpus, tmp_path):
    docs, few = corpus
    # The default --split 969,30,1 leaves a 120-document corpus no test documents; training asks
    # the test split for 0 samples, which megatron-core could not build (it never returned).
    train, valid, test = _build([docs], "969,30,1", 32, [8, 4, 0], tmp_path)
    assert len(train) >= 8 and len(valid) >= 4 and test is None
    train, valid, test = _build(["0.7", docs, "0.3", few], "969,30,1", 32, [8, 4, 0], tmp_path)
    assert len(train) >= 8 and len(valid) >= 4 and test is None


def test_samples_asked_of_a_split_without_a_share_are_refused(corpus, tmp_path):
    with pytest.raises(DataConfigError, match="no share.*--eval-iters 0"):
        _build([corpus[0]], "90,0,10", 32, [8, 4, 0], tmp_path)


def _env():
    env = system._env()
    with socket.socket() as s:  # a port of its own: another test's run may hold the default
        s.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(s.getsockname()[1])
    return env


def test_the_command_line_reports_an_empty_split_cleanly(data):
    # The tester's repro: the 150-document corpus has no valid documents at --split 999,1,0.
    out = system._pretrain(*MODEL, "--data-path", data, "--split", "999,1,0", "--seq-length", "512",
                           "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
                           "--eval-iters", "1", "--device", "cpu", env=_env(), check=False, timeout=180)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "error: the valid split" in out.stderr and "--eval-iters 0" in out.stderr
    assert "Traceback" not in out.stderr


# The learning-rate schedule on resume.

SAVED = ["--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-decay-iters", "8"]


def _run(data, iters, *extra, check=True):
    return system._pretrain(*MODEL, "--data-path", data, "--split", "90,10,0", "--seq-length", "64",
                            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", iters,
                            "--eval-iters", "0", "--log-interval", "1", "--device", "cpu", *extra,
                            env=_env(), check=check)


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory):
    """A checkpoint at iteration 4 of a cosine schedule from lr 1e-3 to 1e-4 over 8 iterations."""
    ckpt = tmp_path_factory.mktemp("schedule") / "ckpt"
    _run(data, 4, *SAVED, "--save", ckpt)
    return ckpt


def _cosine(step, max_lr, min_lr=1e-4, decay=8):
    return min_lr + 0.5 * (math.cos(math.pi * step / decay) + 1) * (max_lr - min_lr)


def _logged_lrs(stdout):
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"iteration\s+(\d+)/\d+ \|.*? \| lr (\S+) \|", stdout)}


def test_a_changed_lr_is_refused_on_resume_by_default(data, saved):
    out = _run(data, 6, *SAVED[2:], "--lr", "2e-3", "--load", saved, check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    err = out.stderr
    assert "error: " in err and "Traceback" not in err
    assert "--lr 0.002 vs 0.001" in err and "command line vs checkpoint" in err
    assert "--override-opt-param-scheduler" in err and "--use-checkpoint-opt-param-scheduler" in err
    assert "iteration " not in out.stdout  # refused before any training


@pytest.mark.parametrize("flag, max_lr", [("--override-opt-param-scheduler", 2e-3),
                                          ("--use-checkpoint-opt-param-scheduler", 1e-3)])
def test_a_flag_picks_the_schedule_on_resume(data, saved, flag, max_lr):
    out = _run(data, 6, *SAVED[2:], "--lr", "2e-3", "--load", saved, flag)
    assert _logged_lrs(out.stdout) == {it: f"{_cosine(it, max_lr):.3e}" for it in (5, 6)}, out.stdout
    line = next(l for l in out.stdout.splitlines() if l.startswith("lr schedule after resume"))
    assert flag in line and f"lr {max_lr!r}," in line and "step 4" in line


def test_an_unchanged_schedule_resumes_and_says_so(data, saved):
    out = _run(data, 5, *SAVED, "--load", saved)
    assert _logged_lrs(out.stdout) == {5: f"{_cosine(5, 1e-3):.3e}"}
    assert "lr schedule after resume: the command line's, which agrees with the checkpoint's" in out.stdout


# The same rules on the scheduler itself (no training run needed).

BASE = ["--hidden-size", "64", "--num-layers", "2", "--seq-length", "64", "--data-path", "x", "--device", "cpu"]


class _Optimizer:
    """The part of a megatron optimizer the scheduler uses: its parameter groups."""

    def __init__(self, lr, min_lr):
        self.param_groups = [{"params": [], "max_lr": lr, "min_lr": min_lr, "wd_mult": 1.0},
                             {"params": [], "max_lr": lr, "min_lr": min_lr, "wd_mult": 0.0}]


def _scheduler(*argv):
    args = parse_args(BASE + list(argv), world_size=1)
    return build_scheduler(_Optimizer(args.lr, args.min_lr), args)


def _saved_state(*argv, steps=3):
    sched = _scheduler(*argv)
    sched.step(steps)
    return sched.state_dict()


def test_the_flags_exclude_each_other():
    with pytest.raises(ArgumentError, match="exclude each other"):
        parse_args(BASE + ["--train-iters", "4", "--override-opt-param-scheduler",
                           "--use-checkpoint-opt-param-scheduler"], world_size=1)


def test_every_mismatch_is_listed():
    sd = _saved_state("--train-iters", "4", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine",
                      "--lr-warmup-iters", "1")
    later = _scheduler("--train-iters", "6", "--lr", "3e-3", "--min-lr", "2e-4", "--lr-decay-style", "linear",
                       "--lr-warmup-iters", "2", "--weight-decay", "0.1")
    with pytest.raises(ArgumentError) as err:
        later.load_state_dict(sd)
    msg = str(err.value)
    for words in ("--lr 0.003 vs 0.001", "--min-lr 0.0002 vs 0.0001", "--lr-warmup-iters 2 vs 1",
                  "--lr-decay-iters (from --train-iters) 6 vs 4", "--lr-decay-style linear vs cosine",
                  "--weight-decay 0.1 vs 0.001", "--override-opt-param-scheduler",
                  "--use-checkpoint-opt-param-scheduler"):
        assert words in msg, msg
    assert msg.count("--weight-decay") == 1


def test_a_longer_run_changes_the_decay_only_where_it_derives_from_train_iters():
    cosine = ["--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine"]
    with pytest.raises(ArgumentError, match=r"--lr-decay-iters \(from --train-iters\) 6 vs 4"):
        _scheduler("--train-iters", "6", *cosine).load_state_dict(_saved_state("--train-iters", "4", *cosine))
    # An explicit --lr-decay-iters stays put when the run is extended.
    fixed = [*cosine, "--lr-decay-iters", "8"]
    later = _scheduler("--train-iters", "6", *fixed)
    later.load_state_dict(_saved_state("--train-iters", "4", *fixed))
    assert later.num_steps == 3 and later.lr_decay_steps == 8
    # A constant lr does not depend on the decay length (nor on --min-lr): nothing to refuse.
    later = _scheduler("--train-iters", "6", "--lr", "1e-3", "--min-lr", "1e-5")
    later.load_state_dict(_saved_state("--train-iters", "4", "--lr", "1e-3"))
    assert later.lr_decay_steps == 6 and later.optimizer.param_groups[0]["lr"] == 1e-3


def test_the_groups_follow_the_chosen_schedule():
    # megatron-core's optimizer state brings back each group's max_lr/min_lr, which get_lr prefers
    # over the scheduler's: the chosen schedule must replace them.
    sd = _saved_state("--train-iters", "4", "--lr", "1e-3", "--weight-decay", "0.01")
    for flag, lr, wd in (("--override-opt-param-scheduler", 2e-3, 0.02),
                         ("--use-checkpoint-opt-param-scheduler", 1e-3, 0.01)):
        sched = _scheduler("--train-iters", "6", "--lr", "2e-3", "--weight-decay", "0.02", flag)
        for group in sched.optimizer.param_groups:  # as optimizer.load_state_dict leaves them
            group["max_lr"] = 1e-3
        sched.load_state_dict(sd)
        first, no_decay = sched.optimizer.param_groups
        assert (sched.max_lr, first["max_lr"], first["lr"], no_decay["lr"]) == (lr, lr, lr, lr), flag
        assert (first["weight_decay"], no_decay["weight_decay"]) == (wd, 0.0), flag


def test_the_wsd_phase_is_saved_and_compared():
    wsd = ["--lr", "1e-3", "--lr-decay-style", "WSD", "--lr-decay-iters", "10"]
    sd = _saved_state("--train-iters", "10", *wsd, "--lr-wsd-decay-iters", "4")
    assert sd["wsd_decay_steps"] == 4
    with pytest.raises(ArgumentError, match="--lr-wsd-decay-iters 2 vs 4"):
        _scheduler("--train-iters", "10", *wsd, "--lr-wsd-decay-iters", "2").load_state_dict(sd)
    kept = _scheduler("--train-iters", "10", *wsd, "--lr-wsd-decay-iters", "2", "--use-checkpoint-opt-param-scheduler")
    kept.load_state_dict(sd)
    assert kept.wsd_decay_steps == 4
