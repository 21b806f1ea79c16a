"""The one base class of the errors that mean "the run was asked for something impossible".

Entry points (``pretrain``, the tools) print these as one ``error: <message>`` line and exit 2;
any other exception is a bug and keeps its traceback. It derives from ValueError so that code
catching ValueError around a loader keeps working.
"""


class UsageError(ValueError):
    """Bad user input (arguments, config, data files, tokenizer, checkpoint): the message names
    the problem and the fix."""


# What an entry point reports as ``error: ...`` (exit 2): the family above, and FileNotFoundError,
# which the loaders raise naming a path the user gave (a .pth, a checkpoint's model_config.json).
INPUT_ERRORS = (UsageError, FileNotFoundError)
