"""User-facing errors. The CLI prints their message (no traceback) and exits with status 2."""


class ZenithError(Exception):
    """Base class: something the user can fix (a config key, a file, a tensor); the message says what."""


class ConfigError(ZenithError):
    """A merge config is invalid; the message names the key path and the bad value."""


class CheckpointError(ZenithError):
    """A source checkpoint is unreadable or inconsistent; the message names the file and tensor."""


class PlanError(ZenithError):
    """The requested merge cannot be planned (incompatible sources, unsupported architecture, ...)."""


class OutputError(ZenithError):
    """The output folder cannot be written as asked (not empty, inside a source model, plan changed on resume)."""


class CalibrationError(ZenithError):
    """A calibration forward pass cannot run (model folder unloadable, 8-bit or offload unavailable here)."""
