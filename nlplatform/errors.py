"""The one exception type the command line turns into a clear message and exit code 2."""


class UserError(Exception):
    """Bad input from the person running a command: a recipe, a path, a corpus, a checkpoint.

    The message is the whole story (what is wrong and how to fix it); the CLI prints it without a traceback and
    exits with status 2.
    """


class ConfigError(UserError):
    """A recipe that does not load: unknown key, wrong type, impossible value, missing file."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the last good checkpoint."""
