"""zo2's exceptions: one class per status code of the C API (include/zo2.h).

Every exception carries zo2's own message (the C API's ``zo2_last_error()``, e.g.
``"zo2_session_init: lr -1: must be finite and >= 0"``) and the status code in ``.status``.
Each class also derives from the closest built-in exception, so ``except ValueError`` and
``except OSError`` keep working in code that does not know zo2.
"""

from __future__ import annotations


class Error(Exception):
    """Base class of every error zo2 raises. ``status`` is the C API's status code."""

    status: int = -7


class InvalidArgumentError(Error, ValueError):
    """ZO2_ERR_INVALID_ARGUMENT (-1): a bad value from the caller; nothing was changed."""

    status = -1


class InvalidTypeError(InvalidArgumentError, TypeError):
    """An argument of the wrong type (a str where an int goes, a float array of token ids).

    Its status is ZO2_ERR_INVALID_ARGUMENT (-1) too. It is a :class:`TypeError`, as Python
    code expects of a wrong type, and stays an :class:`InvalidArgumentError` (so also a
    ``ValueError``) for code written before this class existed.
    """

    status = -1


class FileIOError(Error, OSError):
    """ZO2_ERR_IO (-2): a file could not be opened, read, written or renamed."""

    status = -2


class FormatError(Error, ValueError):
    """ZO2_ERR_FORMAT (-3): a file is malformed (config.json, safetensors, JSONL, ...)."""

    status = -3


class UnsupportedError(Error, NotImplementedError):
    """ZO2_ERR_UNSUPPORTED (-4): valid input zo2 does not run (a config field, a dtype)."""

    status = -4


class OutOfMemoryError(Error, MemoryError):
    """ZO2_ERR_OUT_OF_MEMORY (-5): the device cap or host memory is too small.

    From :func:`zo2.plan`, it also has ``minimum_cap_bytes`` (the smallest cap that runs).
    """

    status = -5


class DeviceError(Error, RuntimeError):
    """ZO2_ERR_DEVICE (-6): a backend call failed or no such device exists."""

    status = -6


class InternalError(Error, RuntimeError):
    """ZO2_ERR_INTERNAL (-7): a bug in zo2 (an invariant did not hold)."""

    status = -7


class AbortedError(Error):
    """ZO2_ABORTED (1): a run stopped itself, e.g. :func:`zo2.train` after 10 steps in a row
    whose losses were not finite (it saved first)."""

    status = 1


_BY_STATUS = {
    cls.status: cls
    for cls in (InvalidArgumentError, FileIOError, FormatError, UnsupportedError, OutOfMemoryError,
                DeviceError, InternalError, AbortedError)
}
