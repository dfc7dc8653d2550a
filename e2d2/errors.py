"""Exceptions for bad user input. The CLI prints their message alone, without a traceback."""


class UserError(Exception):
    """Bad input from the user (config, data file, CLI argument). The message names the fix."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value, raised at dataclass construction."""


def require(condition: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


class ReportedElsewhere(Exception):
    """This process stops because of an error that another process (a peer rank) reports:
    the CLI exits with ``code`` and prints nothing, so the console shows the error once."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code
