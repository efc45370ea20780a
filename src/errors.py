"""The errors a user can fix: each is reported as one line and exit code 2 (see main.main).

A leaf module, so that main.py and every sibling module can raise them without importing each other.
"""


class CNNError(Exception):
    """A problem the user can fix (bad config, bad data, bad file): one line, exit code 2."""

    exit_code = 2


class ConfigError(CNNError):
    """A config file, a flag or a model's architecture that cannot be used."""


class DataError(CNNError):
    """A data set, IDX file or image that cannot be read."""


class ModelFileError(CNNError):
    """A model file that is not a valid numpy-cnn model."""


class OutputError(CNNError):
    """An output file that could not be written (a full disk, a FIFO nobody reads): one line, exit code 4."""

    exit_code = 4
