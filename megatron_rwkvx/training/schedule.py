"""The learning-rate and weight-decay schedule, with Megatron-LM's rules for a resume: the
command line's schedule (--override-opt-param-scheduler), the checkpoint's
(--use-checkpoint-opt-param-scheduler), or by default either as long as they agree."""
from __future__ import annotations

import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_rwkvx.training.arguments import ArgumentError


def build_scheduler(optimizer, args) -> "RWKVXParamScheduler":
    # Lengths in the unit the loop steps the scheduler by (``args.lr_schedule_unit`` per
    # iteration): iterations, or samples for a --train-samples run.
    wsd = args.lr_schedule_wsd if args.lr_decay_style == "WSD" else None
    if args.override_opt_param_scheduler:
        source = SCHEDULE_FROM_COMMAND_LINE
    elif args.use_checkpoint_opt_param_scheduler:
        source = SCHEDULE_FROM_CHECKPOINT
    else:
        source = SCHEDULE_MUST_MATCH
    return RWKVXParamScheduler(
        optimizer,
        source=source,
        unit="sample" if args.train_samples is not None else "iteration",
        decay_iters_hint=((" (from --train-samples)" if args.train_samples is not None else " (from --train-iters)")
                          if getattr(args, "lr_decay_iters_from_train_iters", False) else ""),
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_schedule_warmup,
        lr_decay_steps=args.lr_schedule_decay,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.lr_schedule_total,
        wd_incr_style="constant",
        wsd_decay_steps=wsd,
        lr_wsd_decay_style="cosine" if wsd else None,
    )


SCHEDULE_FROM_COMMAND_LINE = "command line"
SCHEDULE_FROM_CHECKPOINT = "checkpoint"
SCHEDULE_MUST_MATCH = "match"

# (state-dict key, the megatron-core 0.16.1 keys of older checkpoints, the flag that sets it)
_SCHEDULE_FIELDS = (
    ("max_lr", ("start_lr",), "--lr"),
    ("min_lr", (), "--min-lr"),
    ("lr_warmup_steps", ("warmup_iter", "warmup_steps"), "--lr-warmup-iters"),
    ("lr_decay_steps", ("end_iter", "decay_steps"), "--lr-decay-iters"),
    ("lr_decay_style", ("decay_style",), "--lr-decay-style"),
    ("wsd_decay_steps", (), "--lr-wsd-decay-iters"),
    ("start_wd", (), "--weight-decay"),
    ("end_wd", (), None),  # the same flag as start_wd: reported once
    ("wd_incr_style", (), "weight-decay increment style"),
    ("wd_incr_steps", (), "weight-decay increment iterations (--train-iters)"),
)


def _saved(state_dict: dict, key: str, legacy=()):
    for k in (*legacy, key):
        if k in state_dict:
            return True, state_dict[k]
    return False, None


class RWKVXParamScheduler(OptimizerParamScheduler):
    """megatron-core's scheduler with Megatron-LM's resume rules made explicit.

    ``source`` picks the schedule a resume continues with: the command line's
    (--override-opt-param-scheduler), the checkpoint's (--use-checkpoint-opt-param-scheduler), or,
    by default, either as long as they agree on every value that shapes the learning rate and
    weight decay: a disagreement is an ``ArgumentError`` listing each value. megatron-core alone
    asserts on the first mismatch (or, with ``use_checkpoint_opt_param_scheduler``, silently keeps
    the checkpoint's values), and the optimizer state restores each group's ``max_lr``/``min_lr``,
    which outrank the scheduler's own values in ``get_lr``: this class sets them to the schedule
    it chose.
    """

    def __init__(self, optimizer, *, source: str, decay_iters_hint: str = "", unit: str = "iteration", **kwargs):
        if source not in (SCHEDULE_FROM_COMMAND_LINE, SCHEDULE_FROM_CHECKPOINT, SCHEDULE_MUST_MATCH):
            raise ValueError(f"unknown schedule source {source!r}")
        self.source = source
        self.decay_iters_hint = decay_iters_hint
        self.unit = unit  # what one scheduler step is: an iteration, or a sample (--train-samples)
        super().__init__(optimizer, use_checkpoint_opt_param_scheduler=False,
                         override_opt_param_scheduler=False, **kwargs)
        # What a fresh optimizer holds per group (the optimizer state of a resume replaces it) and
        # the command line's values, to tell the groups that follow the schedule from overrides.
        self._group_lrs = [(g.get("max_lr"), g.get("min_lr")) for g in optimizer.param_groups]
        self._command_line_lrs = (self.max_lr, self.min_lr)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        # megatron-core does not save the WSD phase; without it a resume cannot compare or keep it.
        sd["wsd_decay_steps"] = self.wsd_decay_steps
        sd["lr_wsd_decay_style"] = self.lr_wsd_decay_style
        return sd

    def _relevant(self, key: str, saved_style: str, saved_wd_style: str) -> bool:
        """Whether ``key`` changes the learning rate or weight decay under either schedule."""
        styles = {self.lr_decay_style, saved_style}
        if key in ("min_lr", "lr_decay_steps"):
            return styles != {"constant"}
        if key == "wsd_decay_steps":
            return "WSD" in styles
        if key == "wd_incr_steps":
            return {self.wd_incr_style, saved_wd_style} != {"constant"}
        return True

    def schedule_mismatches(self, state_dict: dict) -> list:
        """``[(what, command line value, checkpoint value)]`` for the values that shape the
        schedule and differ; values the checkpoint does not hold are not compared."""
        saved_style = _saved(state_dict, "lr_decay_style", ("decay_style",))[1]
        saved_wd_style = state_dict.get("wd_incr_style", self.wd_incr_style)
        out = []
        for key, legacy, flag in _SCHEDULE_FIELDS:
            present, value = _saved(state_dict, key, legacy)
            ours = getattr(self, key)
            if not present or value == ours or not self._relevant(key, saved_style, saved_wd_style):
                continue
            if key == "end_wd" and any(what == "--weight-decay" for what, _, _ in out):
                continue  # both ends come from --weight-decay
            if flag and self.unit == "sample" and flag.startswith("--lr-"):
                flag = flag.replace("-iters", "-samples")
            if key == "lr_decay_steps":
                flag += self.decay_iters_hint
            out.append((flag or "--weight-decay (end)", ours, value))
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        mismatches = self.schedule_mismatches(state_dict)
        if mismatches and self.source == SCHEDULE_MUST_MATCH:
            listed = "; ".join(f"{what} {_show(ours)} vs {_show(theirs)}" for what, ours, theirs in mismatches)
            raise ArgumentError(
                "the learning-rate schedule of the command line differs from the one of the "
                f"checkpoint being resumed (command line vs checkpoint): {listed}. Add "
                "--override-opt-param-scheduler to train on with the command line's values, or "
                "--use-checkpoint-opt-param-scheduler to keep the checkpoint's"
            )
        from_checkpoint = self.source == SCHEDULE_FROM_CHECKPOINT
        self.use_checkpoint_opt_param_scheduler = from_checkpoint
        self.override_opt_param_scheduler = not from_checkpoint  # equal where it matters otherwise
        super().load_state_dict(state_dict)
        if from_checkpoint and state_dict.get("wsd_decay_steps") is not None:
            self.wsd_decay_steps = state_dict["wsd_decay_steps"]
            self.lr_wsd_decay_style = state_dict.get("lr_wsd_decay_style") or self.lr_wsd_decay_style
        groups = self.optimizer.param_groups
        if len(groups) == len(self._group_lrs):
            for group, built in zip(groups, self._group_lrs):
                for key, built_value, command_line, final in zip(
                        ("max_lr", "min_lr"), built, self._command_line_lrs, (self.max_lr, self.min_lr)):
                    if built_value is None:
                        continue  # the group reads the scheduler's value
                    if built_value == command_line:  # a group on the common schedule
                        group[key] = final
                    elif not from_checkpoint:  # a group with its own value: the command line's
                        group[key] = built_value
        # megatron-core sets the groups' lr before it reads the weight-decay values (and knows no
        # WSD phase): set both again from the final values.
        self.step(0)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(self.describe(), flush=True)

    def describe(self) -> str:
        where = {
            SCHEDULE_FROM_COMMAND_LINE: "the command line's (--override-opt-param-scheduler)",
            SCHEDULE_FROM_CHECKPOINT: "the checkpoint's (--use-checkpoint-opt-param-scheduler)",
            SCHEDULE_MUST_MATCH: "the command line's, which agrees with the checkpoint's",
        }[self.source]
        decay = self.lr_decay_style
        if decay != "constant":
            decay += f" to min lr {_show(self.min_lr)} by {self.unit} {self.lr_decay_steps}"
            if decay.startswith("WSD"):
                decay += f" (last {self.wsd_decay_steps} {self.lr_wsd_decay_style})"
        groups = self.optimizer.param_groups
        now = self.get_lr(groups[0]) if groups else self.max_lr
        return (
            f"lr schedule after resume: {where}: lr {_show(self.max_lr)}, warmup "
            f"{self.lr_warmup_steps} {self.unit}s, decay {decay}, weight decay {_show(self.start_wd)}; "
            f"step {self.num_steps}, lr now {now:.6g}"
        )


def _show(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)
