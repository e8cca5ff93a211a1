"""User-facing errors. The CLI prints their message (no traceback) and exits with status 2."""

import errno


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


class FileSystemError(ZenithError):
    """A file could not be read or written (permission, disk full, read-only filesystem, ...)."""


_HINTS = {
    errno.ENOSPC: "the disk is full: free space (or choose another output folder), then rerun with --resume",
    errno.EDQUOT: "the disk quota is exceeded: free space, then rerun with --resume",
    errno.EACCES: "permission denied: check the folder's permissions",
    errno.EPERM: "operation not permitted: check the folder's permissions",
    errno.EROFS: "the filesystem is read-only: choose another output folder",
}


def from_os_error(err: OSError) -> FileSystemError:
    """The one-line error for an OSError that reached a command: the file, what failed, what to do."""
    where = err.filename if err.filename is not None else "a file"
    if err.filename2 is not None:
        where = f"{where} -> {err.filename2}"
    hint = _HINTS.get(err.errno)
    return FileSystemError(f"{where}: {err.strerror or err}" + (f" ({hint})" if hint else ""))
