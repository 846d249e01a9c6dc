"""The user's mistakes, told apart from bugs.

A check of something the user chose (an option's value, a file or folder they named, a run folder in use, a
download their machine cannot make) raises a `UsageError` whose message names the setting as the user typed it
(`--data`, `--batch-size`) and the fix. The scripts print it as one line, `error: ...`, and exit with status 2
(`vqhit.cli.run`); any other exception is a bug and keeps its traceback.

`UsageError` is a `ValueError`, so library callers catch it as one. `NotFoundError`, `UnavailableError` and
`DivergedError` are also the built-in types of their kind (`FileNotFoundError`, `RuntimeError`,
`FloatingPointError`).
"""


class UsageError(ValueError):
    """Something the user asked for cannot be done as asked; the message says what to change."""


class NotFoundError(UsageError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class OwnDataError(UsageError):
    """A mistake in the data that only this process met (an unreadable image of its shard, with --bad-images raise):
    the other processes cannot know it, so this one reports it, whatever its rank."""


class UnavailableError(UsageError, RuntimeError):
    """Something the command needs is not available now: a folder another run holds, a download with no network."""


class DivergedError(UsageError, FloatingPointError):
    """Training diverged (a loss became NaN or infinite): the message names the checkpoint to go back to and a lower
    learning rate; a setting to change, not a bug."""
