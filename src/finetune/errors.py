"""Errors in what the user gave (config, data, files, network): `train.py`/`eval.py` print their message alone.

Each message says what is wrong and what to change, so a traceback would only hide it. Every class also
derives from the built-in error it replaces, so `except ValueError` / `FileNotFoundError` still work.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate


class UserError(Exception):
    """Bad input rather than a bug: the command line shows `Error: <message>` and exits with status 1."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key."""


class DataError(UserError, ValueError):
    """Data that cannot be used as given (classes, splits, images); the message names the file or folder."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the config points at does not exist."""


class DamagedFileError(UserError, ValueError):
    """A file that does not read whole (cut short, overwritten); the message names it and a whole one to use instead."""


class DownloadError(UserError, RuntimeError):
    """Data or weights that could not be fetched or failed their checksum; the message says how to give them locally."""


class MissingPackageError(UserError, ImportError):
    """An optional package the config needs (a tracker's) is not installed; the message says how to install it."""


class DiskFullError(UserError, OSError):
    """No space left where a file is written; the message names the folder, the space needed and the space free."""


def instantiate_unwrapped(config: Any, **kwargs: Any) -> Any:
    """Hydra's instantiate, but a UserError raised inside comes out as itself, not wrapped in Hydra's error."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if not isinstance(cause, UserError):
            raise
    raise cause


def exit_on_user_error(task: Callable[..., Any], *args: Any) -> Any:
    """Runs a command's task; a UserError ends it with its message as one `Error:` line and exit status 1."""
    try:
        return task(*args)
    except UserError as err:  # a missing or unsafe file, bad data or config: the message says what to change
        sys.exit(f"Error: {err}")
