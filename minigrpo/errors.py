"""minigrpo's error classes: light (no imports), so every layer can raise them and the CLI can map them to
exit codes without importing the layers (README, "Exit codes"): a user's mistake exits 2 with the message, a
run that stopped itself exits 3.
"""


class MinigrpoError(Exception):
    """Base of the errors minigrpo reports to a user as a message, never as a traceback."""


class ConfigError(MinigrpoError, ValueError):
    """A bad key or value in the config; the message names the key and what it accepts."""


class DataError(MinigrpoError, ValueError):
    """Bad input data; the message names the file and line (or row) and the fix."""


class DataNotFound(DataError, FileNotFoundError):
    """A dataset file or folder that is not there."""


class TrainingStopped(MinigrpoError, RuntimeError):
    """The run stopped itself (Ctrl-C, or too many non-finite updates in a row); the message says why, where
    its last checkpoint is and how to go on."""


class DiskError(TrainingStopped):
    """A write failed because the disk is full or the folder cannot be written; the message names the path and
    what is still safe."""


class NonFiniteError(TrainingStopped):
    """The model's logits were NaN or inf, or its activations overflowed float32, while generating: its weights
    are broken (e.g. a learning rate far too high). The GRPO loop says more (the step, the learning rate, the last
    checkpoint); elsewhere (evaluation of a broken model) it stops the command as it is (exit 3)."""
