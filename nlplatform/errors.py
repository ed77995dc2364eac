"""The exceptions the command line turns into a clear message and an exit code (2 for bad input)."""


def one_line(exc: BaseException) -> str:
    """An exception as one line for a message: its first line (at most 300 characters), or its type's name."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


class UserError(Exception):
    """Bad input from the person running a command: a recipe, a path, a corpus, a checkpoint.

    The message is the whole story (what is wrong and how to fix it); the CLI prints it without a traceback and
    exits with status 2.
    """


class ConfigError(UserError):
    """A recipe that does not load: unknown key, wrong type, impossible value, missing file."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the last good checkpoint."""


class RunStopped(Exception):
    """Training stopped on a signal after saving ``last.ckpt``; the message says how to continue. The command line
    exits with ``exit_code`` (128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
