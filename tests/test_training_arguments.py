"""Argument validation fails early with messages that name the problem and the fix."""
import pytest

from megatron_rwkvx.training.arguments import ArgumentError, parse_args

BASE = ["--hidden-size", "64", "--num-layers", "2", "--seq-length", "64", "--train-iters", "3",
        "--data-path", "x", "--device", "cpu"]


def test_defaults_follow_the_paper_recipe():
    args = parse_args(BASE, world_size=1)
    assert (args.adam_beta1, args.adam_beta2, args.adam_eps) == (0.9, 0.99, 1e-18)
    assert args.weight_decay == 0.001 and args.clip_grad == 1.0
    assert args.data_parallel_size == 1 and args.global_batch_size == 1


def test_train_tokens_become_iterations():
    args = parse_args([a for a in BASE if a not in ("--train-iters", "3")] +
                      ["--train-tokens", "1000", "--global-batch-size", "4"], world_size=1)
    assert args.train_iters == 4  # ceil(1000 / (4 * 64))


@pytest.mark.parametrize(
    "extra, world, words",
    [
        (["--tensor-model-parallel-size", "3"], 4, ["world size 4", "tensor x pipeline x context"]),
        (["--context-parallel-size", "3"], 3, ["--seq-length 64", "--context-parallel-size 3"]),
        (["--global-batch-size", "3", "--micro-batch-size", "2"], 1, ["--global-batch-size 3"]),
        (["--train-tokens", "10"], 1, ["exactly one of --train-iters, --train-tokens and --train-samples",
                                       "got --train-iters and --train-tokens"]),
        (["--lr-decay-style", "WSD"], 1, ["--lr-wsd-decay-iters"]),
        (["--min-lr", "1", "--lr", "0.1"], 1, ["--min-lr"]),
        (["--lr", "-1"], 1, ["--lr must be > 0, got -1.0"]),  # was "--min-lr 0.0 exceeds --lr -1.0"
        (["--lr", "0"], 1, ["--lr must be > 0"]),
        (["--min-lr=-1e-5"], 1, ["--min-lr must be >= 0"]),
        (["--save-interval", "5"], 1, ["--save"]),
        (["--loss", "longce", "--longce-stride", "10", "--longce-window", "5"], 1, ["--longce-stride"]),
        (["--loss", "longce", "--pipeline-model-parallel-size", "2"], 2,
         ["--pipeline-model-parallel-size 1"]),
        (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--context-parallel-size", "2",
          "--seq-length", "66"], 4, ["--sequence-parallel", "divisible"]),
    ],
)
def test_impossible_runs_are_refused(extra, world, words):
    argv = list(BASE)
    if "--seq-length" in extra:
        i = argv.index("--seq-length"); del argv[i:i + 2]
    with pytest.raises(ArgumentError) as err:
        parse_args(argv + extra, world_size=world)
    for w in words:
        assert w in str(err.value)


def test_missing_essentials():
    with pytest.raises(ArgumentError, match="--data-path"):
        parse_args([a for a in BASE if a not in ("--data-path", "x")], world_size=1)
    with pytest.raises(ArgumentError, match="--seq-length"):
        parse_args(["--hidden-size", "64", "--num-layers", "2", "--train-iters", "1", "--data-path", "x"], world_size=1)
