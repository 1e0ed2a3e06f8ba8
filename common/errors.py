"""The errors a user sees as one clear line (the CLI imports them without the heavy libraries)."""


class DataError(ValueError):
    """A site's data breaks the contract; the message lists every problem with its file."""


class ConfigError(ValueError):
    """A run-config key has a bad value; the message names the key."""
