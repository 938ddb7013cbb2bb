from lorafit.redact import redact

"""The few exception types a user sees. The CLI prints them as one paragraph and exits with their code."""


class LorafitError(Exception):
    """An expected problem the user can act on: printed without a traceback."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):

        message, hint = redact(message), redact(hint) if hint else hint  # messages quote user input: a pasted token
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class ConfigError(LorafitError):
    """The config file or an override is invalid (every problem listed at once)."""


class DataError(LorafitError):
    """The training data cannot be read or cannot train."""


class ModelError(LorafitError):
    """The model cannot be found, accessed or loaded."""


class RunDirError(LorafitError):
    """The run directory is missing, incomplete, or would be overwritten."""


class TrainingError(LorafitError):
    """Training stopped on a fault (NaN loss, out of memory, a failed save)."""

    exit_code = 1
