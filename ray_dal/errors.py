"""Errors a user can fix, and how an error raised inside a Ray Data worker reaches the driver intact.

Ray Data wraps an exception raised in a UDF in ``UserCodeException`` and, on the driver, in a
``RayTaskError``: the type is lost (``except ImageDecodeError`` never matches) and so are attributes
such as ``bad_ids``. A UDF wrapped with `carry` raises `CarriedError` instead, which pickles the
original as (type, args, vars); on the driver, `original_errors` finds it behind Ray's wrappers and
re-raises the original itself, e.g. ``ImageDecodeError`` with its ids. `CarriedError` is a
``UserCodeException``, so Ray Data stops at once instead of retrying a deterministic failure.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
import sys
from typing import Callable, Iterator

import ray
from ray.exceptions import RayTaskError, UserCodeException

from .config import ConfigError
from .data.pools import PoolError
from .data.transforms import ImageDecodeError
from .storage import StorageError
from .topk import NonFiniteScoreError


class WeightsError(ValueError):
    """Model weights (a checkpoint, a round's model.pt, a trained model) are unusable; says which and why."""


# Errors whose message says what is wrong and how to fix it: entry points print them without a traceback.
USER_ERRORS = (ConfigError, PoolError, ImageDecodeError, NonFiniteScoreError, WeightsError, StorageError)


class CarriedError(UserCodeException):
    """An exception raised in a Ray worker, on its way to the driver with its type and attributes."""

    def __init__(self, error: BaseException):
        self.error = error
        super().__init__(f"{type(error).__name__}: {error}")

    def __reduce__(self):
        return (_rebuild, _parts(self.error))

    @classmethod
    def wrap(cls, error: BaseException) -> "CarriedError":
        try:
            pickle.loads(pickle.dumps(_parts(error)))
        except Exception:  # an unpicklable error still reaches the driver as its type name and message
            error = RuntimeError(f"{type(error).__name__}: {error}")
        return cls(error)


def _parts(error: BaseException) -> tuple:
    return type(error), error.args, dict(vars(error))


def _rebuild(cls: type, args: tuple, state: dict) -> CarriedError:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return CarriedError(error)


def carry(fn: Callable) -> Callable:
    """Wrap a UDF (function or ``__call__``) so that its exceptions travel as `CarriedError`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            raise CarriedError.wrap(error) from error

    return wrapper


def carried(ds: ray.data.Dataset) -> ray.data.Dataset:
    """Let `CarriedError` leave ``ds``'s UDFs as it is (Ray Data would wrap it in another exception)."""
    ds.context.raise_original_map_exception = True
    return ds


def root_cause(error: BaseException) -> BaseException | None:
    """The exception a `carry`-wrapped UDF raised, found behind Ray's wrappers; None if there is none."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, CarriedError):
            return error.error
        error = error.cause if isinstance(error, RayTaskError) else error.__cause__
    return None


@contextlib.contextmanager
def original_errors(where: str) -> Iterator[None]:
    """Around the driver's consumption of a dataset: re-raise a worker's own exception, noting ``where``."""
    try:
        yield
    except Exception as error:
        root = root_cause(error)
        if root is None:
            raise
        root.add_note(f"(raised inside {where})")
        raise root from None


@contextlib.contextmanager
def exit_on_user_error(prog: str) -> Iterator[None]:
    """For entry points: print a `USER_ERRORS` message (and its notes) and exit 2, without a traceback."""
    try:
        yield
    except USER_ERRORS as error:
        notes = "".join(f"\n{note}" for note in getattr(error, "__notes__", ()))
        print(f"{prog}: error: {error}{notes}", file=sys.stderr)
        raise SystemExit(2) from None
