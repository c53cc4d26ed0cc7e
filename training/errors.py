"""The trainer's user-facing failure: `train.py` prints its message (no traceback) and exits with status 1."""


class TrainingError(RuntimeError):
    """A problem the user can fix (data, models, settings, the cluster); the message says what and how."""
