"""``python -m megatron_rwkvx.evaluation.lm_eval_cli <lm_eval arguments>``: lm-eval's own CLI with
the ``rwkvx`` model type registered (lm-eval finds models only in its registry, so the adapter must
be imported before its CLI parses ``--model``)."""
from __future__ import annotations

import sys


def main() -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("error: lm-evaluation-harness is not installed; install it with `pip install lm_eval`",
              file=sys.stderr)
        return 2
    import megatron_rwkvx.evaluation.lm_eval_adapter  # noqa: F401  (registers --model rwkvx)
    from megatron_rwkvx.errors import INPUT_ERRORS

    try:
        cli_evaluate()
    except INPUT_ERRORS as err:  # the model the adapter was asked for (errors.py): one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
