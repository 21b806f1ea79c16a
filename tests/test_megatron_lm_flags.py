"""Megatron-LM's launch flags: the ones that apply work with Megatron-LM's meaning, the others are
named in one line (issue: a Megatron-LM user's scripts end in argparse usage dumps)."""
from __future__ import annotations

import math

import pytest

from megatron_rwkvx.training.arguments import ArgumentError, parse_args
from megatron_rwkvx.training.schedule import build_scheduler

# Megatron-LM core_v0.16.1's examples, flag for flag except the model's shape, which RWKV-X gives as
# --hidden-size / --head-size / --layer-pattern (their Transformer shape flags are tested below).
GPT3_175B = """--num-layers 96 --hidden-size 12288 --head-size 128 --seq-length 2048
--micro-batch-size 1 --global-batch-size 1536 --train-iters 500000 --weight-decay 0.1
--adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --fp16 --lr 6.0e-5 --lr-decay-style cosine
--min-lr 6.0e-6 --lr-warmup-fraction .001 --lr-decay-iters 430000
--tensor-model-parallel-size 8 --pipeline-model-parallel-size 16 --data-path /data/gpt_text_document
--split 949,50,1 --log-interval 100 --save-interval 10000 --eval-interval 1000 --save /ckpt --load /ckpt
--eval-iters 10 --tensorboard-dir /tb"""

LLAMA3_8B = """--num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --head-size 128
--num-query-groups 8 --seq-length 8192 --attention-dropout 0.0 --hidden-dropout 0.0
--disable-bias-linear --micro-batch-size 1 --global-batch-size 128 --train-samples 1953125000
--lr-decay-samples 1949218748 --lr-warmup-samples 3906252 --lr 0.00015 --min-lr 0.00001
--lr-decay-style cosine --clip-grad 1.0 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95
--bf16 --tensor-model-parallel-size 4 --context-parallel-size 2 --sequence-parallel
--pipeline-model-parallel-size 1 --use-distributed-optimizer --overlap-grad-reduce
--overlap-param-gather --mock-data --split 99,1,0 --no-create-attention-mask-in-dataloader
--num-workers 1 --log-interval 1 --eval-iters 32 --eval-interval 100 --save-interval 1000
--log-throughput --ckpt-format torch_dist --distributed-timeout-minutes 60 --exit-signal-handler
--save /ckpt --load /ckpt --tensorboard-dir /tb --wandb-project llama3 --wandb-exp-name run1
--manual-gc --manual-gc-interval 50"""

MAMBA = """--layer-pattern RRRARRRA --hidden-size 4096 --seq-length 4096 --micro-batch-size 1
--global-batch-size 256 --train-samples 10000 --lr-warmup-samples 100 --lr 2.5e-4 --min-lr 2.5e-5
--lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0 --bf16 --attention-dropout 0.0
--hidden-dropout 0.0 --disable-bias-linear --tensor-model-parallel-size 8
--pipeline-model-parallel-size 1 --use-distributed-optimizer --data-path 1.0 /data/text_document
--split 99,1,0 --make-vocab-size-divisible-by 128 --distributed-timeout-minutes 60
--save /ckpt --load /ckpt --save-interval 2000 --eval-interval 2000 --eval-iters 32
--log-interval 10 --tensorboard-dir /tb --init-from /pretrained.pth --use-checkpoint-args"""


def _parse(text, world, *extra):
    return parse_args(text.split() + list(extra), world_size=world)


def test_megatron_lm_example_command_lines_parse():
    gpt = _parse(GPT3_175B, 128)
    assert (gpt.fp16, gpt.train_iters, gpt.data_parallel_size) == (True, 500000, 1)
    assert gpt.lr_schedule_unit == 1 and gpt.lr_schedule_warmup == 430  # .001 x 430000
    llama = _parse(LLAMA3_8B, 8)
    assert llama.train_iters == 1953125000 // 128 and llama.lr_schedule_unit == 128
    assert (llama.lr_schedule_warmup, llama.lr_schedule_decay) == (3906252, 1949218748)
    assert llama.mock_data and llama.overlap_param_gather and llama.distributed_timeout_minutes == 60
    mamba = _parse(MAMBA, 8)
    assert mamba.train_iters == 10000 // 256 and mamba.use_checkpoint_args


# Each from Megatron-LM's examples, with the message's key words.
NOT_APPLICABLE = {
    "--num-attention-heads 96": ["--num-attention-heads does not apply to RWKV-X", "--head-size"],
    "--max-position-embeddings 2048": ["no position embeddings", "--seq-length"],
    "--position-embedding-type rope": ["no position embeddings"],
    "--rotary-base 500000": ["no position embeddings"],
    "--swiglu": ["squared ReLU", "--ffn-hidden-size"],
    "--normalization RMSNorm": ["norms are fixed"],
    "--group-query-attention": ["--num-query-groups alone"],
    "--untie-embeddings-and-output-weights": ["always separate"],
    "--attention-backend auto": ["--sparse-attention-backend"],
    "--transformer-impl transformer_engine": ["Transformer Engine where it is importable"],
    "--init-method-std 0.006": ["reference's own initialisation"],
    "--hybrid-override-pattern M-M-M*-": ["--layer-pattern"],
    "--moe-router-load-balancing-type aux_loss": ["no mixture-of-experts"],
    "--rampup-batch-size 16 16 5859375": ["not supported by megatron-rwkvx", "constant --global-batch-size"],
    "--hidden-dropout 0.1": ["without dropout", "drop the flag"],
    "--ckpt-format torch": ["torch_dist", "tools/export_checkpoint.py"],
    "--lr-warmup-itrs 10": ["unrecognized argument --lr-warmup-itrs", "did you mean --lr-warmup-iters"],
}


@pytest.mark.parametrize("flag", list(NOT_APPLICABLE))
def test_flags_that_do_not_apply_are_named(flag):
    with pytest.raises(ArgumentError) as err:
        _parse(MAMBA, 8, *flag.split())
    message = str(err.value)
    assert "\n" not in message and "usage:" not in message
    for words in NOT_APPLICABLE[flag]:
        assert words in message, (words, message)


def test_argparse_complaints_are_one_line():
    with pytest.raises(ArgumentError, match=r"^argument --seq-length: invalid int value: 'long'"):
        _parse(MAMBA, 8, "--seq-length", "long")


def _megatron_lm_lr(step, max_lr, min_lr, warmup, decay):
    """Megatron-LM's OptimizerParamScheduler.get_lr for init_lr 0 and cosine decay, in its unit."""
    if warmup > 0 and step <= warmup:
        return max_lr * step / warmup
    ratio = (step - warmup) / (decay - warmup)
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (max_lr - min_lr)


class _Optimizer:
    param_groups = [{"params": [], "wd_mult": 1.0}]


def test_sample_based_schedules_count_samples_as_megatron_lm():
    # A warm-up that ends inside an iteration (6 samples, 4 per iteration), as Megatron-LM's does.
    args = parse_args(["--hidden-size", "64", "--num-layers", "2", "--seq-length", "64", "--data-path", "x",
                       "--device", "cpu", "--global-batch-size", "4", "--train-samples", "42",
                       "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-samples", "6",
                       "--lr-decay-samples", "36", "--lr-decay-style", "cosine"], world_size=1)
    assert args.train_iters == 10 and args.lr_schedule_unit == 4
    sched = build_scheduler(_Optimizer(), args)
    for iteration in range(1, 10):
        sched.step(increment=args.lr_schedule_unit)
        expected = _megatron_lm_lr(4 * iteration, 1e-3, 1e-4, 6, 36) if 4 * iteration <= 36 else 1e-4
        assert sched.get_lr(_Optimizer.param_groups[0]) == pytest.approx(expected, rel=1e-12), iteration


@pytest.mark.parametrize("extra, words", [
    (["--train-samples", "40", "--lr-warmup-iters", "2"], ["--lr-warmup-iters count iterations", "--lr-warmup-samples"]),
    (["--train-iters", "4", "--lr-decay-samples", "9"], ["--lr-decay-samples apply with --train-samples"]),
    (["--train-iters", "4", "--lr-warmup-fraction", "0.5", "--lr-warmup-iters", "1"], ["both set the warm-up"]),
    (["--train-samples", "3", "--global-batch-size", "4"], ["less than one global batch"]),
    (["--train-iters", "4", "--fp16", "--bf16"], ["exclude each other"]),
    (["--train-iters", "4", "--finetune"], ["--finetune", "--load"]),
    (["--train-iters", "4", "--finetune", "--load", "/a", "--save", "/a"], ["another --save"]),
    (["--train-iters", "4", "--overlap-param-gather"], ["--use-distributed-optimizer and --overlap-grad-reduce"]),
    (["--train-iters", "4", "--profile"], ["--use-pytorch-profiler"]),
    (["--train-iters", "4", "--mock-data"], ["--mock-data replaces --data-path"]),
])
def test_megatron_lm_option_combinations_are_checked(extra, words):
    base = ["--hidden-size", "64", "--num-layers", "2", "--seq-length", "64", "--data-path", "x", "--device", "cpu"]
    with pytest.raises(ArgumentError) as err:
        parse_args(base + extra, world_size=1)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_warmup_fraction_and_finetune_mapping():
    base = ["--hidden-size", "64", "--num-layers", "2", "--seq-length", "64", "--data-path", "x", "--device", "cpu"]
    args = parse_args(base + ["--train-iters", "200", "--lr-warmup-fraction", "0.05"], world_size=1)
    assert args.lr_schedule_warmup == 10 and args.lr_schedule_decay == 200
    args = parse_args(base + ["--train-iters", "5", "--finetune", "--load", "/pre", "--save", "/ft"], world_size=1)
    # Megatron-LM's --finetune: the weights of --load, at iteration 0; a requeue resumes its own save.
    assert (args.init_from, args.load) == ("/pre", "/ft")


def test_vocab_padding_follows_megatron_lm():
    from types import SimpleNamespace

    from megatron_rwkvx.training.model_builder import padded_vocab_size

    assert padded_vocab_size(50257, SimpleNamespace(make_vocab_size_divisible_by=128, tensor_model_parallel_size=2)) == 50432
    assert padded_vocab_size(65536, SimpleNamespace(make_vocab_size_divisible_by=128, tensor_model_parallel_size=8)) == 65536
    assert padded_vocab_size(40, SimpleNamespace(make_vocab_size_divisible_by=None, tensor_model_parallel_size=1)) == 40


# Through the real entry point.

def _training_runs(tmp_path):
    import os
    from concurrent.futures import ThreadPoolExecutor

    from test_data_datasets import make_dataset
    from test_training_system import PY, _env, _run

    data = make_dataset(str(tmp_path / "docs"), 120, seed=0)
    tiny = ["--hidden-size", "32", "--head-size", "16", "--layer-pattern", "RA", "--sparse-chunk-size", "16",
            "--sparse-top-k", "1", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "2",
            "--log-interval", "1", "--device", "cpu", "--lr", "1e-3"]
    real = [*tiny, "--data-path", data, "--split", "100,0,0", "--eval-iters", "0"]
    runs = {
        "observability": [*tiny, "--mock-data", "--split", "90,10,0", "--train-samples", "12",
                          "--lr-warmup-fraction", "0.2", "--lr-decay-style", "cosine", "--eval-iters", "1",
                          "--eval-interval", "3", "--manual-gc", "--manual-gc-interval", "2", "--profile",
                          "--use-pytorch-profiler", "--profile-step-start", "1", "--profile-step-end", "3",
                          "--tensorboard-dir", str(tmp_path / "tb"), "--wandb-project", "rwkvx-test",
                          "--wandb-exp-name", "offline-check", "--wandb-save-dir", str(tmp_path / "wandb")],
        "workers 0": [*real, "--train-iters", "4", "--save", str(tmp_path / "pre"), "--save-interval", "4"],
        "workers 1": [*real, "--train-iters", "4", "--num-workers", "1"],
        "fp16": [*real, "--train-iters", "5", "--fp16", "--initial-loss-scale", "16"],
    }
    def launch(argv):
        env = _env()  # a port of its own for each run
        env["WANDB_MODE"] = "offline"
        env.pop("WANDB_API_KEY", None)
        return _run([PY, "-m", "megatron_rwkvx.pretrain", *argv], env=env, timeout=600, check=False)

    with ThreadPoolExecutor(2) as pool:
        out = dict(zip(runs, pool.map(launch, runs.values())))
    # Fine-tuning starts from the first run's save, so it runs after it.
    out["finetune"] = launch([*real, "--train-iters", "2", "--finetune",
                              "--load", str(tmp_path / "pre"), "--save", str(tmp_path / "ft")])
    shapeless = [a for i, a in enumerate(real)
                 if a not in ("--hidden-size", "--layer-pattern") and real[i - 1] not in ("--hidden-size", "--layer-pattern")]
    out["checkpoint args"] = launch([*shapeless, "--train-iters", "5", "--load", str(tmp_path / "pre"),
                                     "--use-checkpoint-args"])
    for name, result in out.items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
    assert os.path.isdir(tmp_path / "wandb")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("megatron_lm_runs")
    return tmp, _training_runs(tmp)


def test_wandb_offline_run_profiler_trace_and_mock_data(runs):
    tmp, out = runs
    from test_training_system import _losses

    assert sorted(_losses(out["observability"].stdout)) == list(range(1, 7))  # 12 samples / 2
    offline = list((tmp / "wandb" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), offline
    assert list((tmp / "tb").glob("*.pt.trace.json")), list((tmp / "tb").iterdir())
    assert "profiling iterations 2 to 3" in out["observability"].stdout


def test_data_loader_workers_read_the_same_batches(runs):
    _, out = runs
    from test_training_system import _losses

    assert _losses(out["workers 0"].stdout) == _losses(out["workers 1"].stdout)
    assert len(_losses(out["workers 1"].stdout)) == 4


def test_fp16_trains_with_dynamic_loss_scaling(runs):
    _, out = runs
    from test_training_system import _losses

    text = out["fp16"].stdout
    finite = [v for v in _losses(text).values() if v != "nan"]
    assert finite and all(math.isfinite(float(v)) for v in finite), text[-2000:]
    assert "loss scale" in text


def test_finetune_starts_at_iteration_zero_and_checkpoint_args_give_the_shape(runs):
    _, out = runs
    from test_training_system import _losses

    ft = out["finetune"].stdout
    assert "resumed" not in ft and sorted(_losses(ft)) == [1, 2], ft[-2000:]
    resumed = out["checkpoint args"].stdout
    assert "resumed from" in resumed and sorted(_losses(resumed)) == [5], resumed[-2000:]
