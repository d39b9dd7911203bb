"""``with_defaults``: a constructor with other defaults, for the classes that differ from their
base only in them (the scenes benchmark's dataset and datamodule), so none copies a
signature."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable


def with_defaults(function: Callable, **defaults) -> Callable:
    """``function`` with other defaults for some of its arguments: what a subclass that only
    changes defaults needs, without copying the signature (annotations, docstring and
    ``inspect.signature`` follow)."""
    names = function.__code__.co_varnames[: function.__code__.co_argcount]
    old = function.__defaults__ or ()
    first = len(names) - len(old)
    unknown = set(defaults) - set(names[first:])
    if unknown:
        raise TypeError(f"{function.__qualname__} has no defaulted argument {sorted(unknown)}")
    new = tuple(defaults.get(name, value) for name, value in zip(names[first:], old))
    made = types.FunctionType(function.__code__, function.__globals__, function.__name__, new,
                              function.__closure__)  # fmt: skip
    functools.update_wrapper(made, function)
    del made.__wrapped__  # inspect.signature reads the new defaults, not the wrapped ones
    return made
