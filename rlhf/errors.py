"""Errors meant for users: the CLI prints their message on one line and exits non-zero, no traceback."""


class RLHFError(Exception):
    """A problem the user can fix (bad config, bad data, missing files). The message says what and where."""

    exit_code = 2


class ConfigError(RLHFError):
    """An invalid configuration value, key or group option."""


class DataError(RLHFError):
    """A data file or dataset that does not match the expected format."""


class ModelError(RLHFError):
    """A model or tokenizer that cannot be loaded or does not fit the role asked of it."""


class RewardError(RLHFError):
    """A reward function that fails or breaks the reward contract."""
