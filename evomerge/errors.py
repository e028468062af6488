"""The EvomergeError family.

Every error a user can cause (a bad path, a malformed file, an impossible setting)
is raised as an :class:`EvomergeError` whose message is one line naming what is
wrong and where. The CLI prints that line and exits with code 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class EvomergeError(Exception):
    """Base class: a problem with the user's input, reported in one line."""

    exit_code = 2

    def __str__(self) -> str:  # one line, whatever the message carried
        return " ".join(super().__str__().split())


class ConfigError(EvomergeError):
    """A YAML file (recipe, run config, evaluator, search space) is malformed or invalid."""


class SourceError(EvomergeError):
    """A source model is missing, unreadable, unsafe or incompatible with the others."""


class MergeError(EvomergeError):
    """A merge cannot be carried out with the given recipe and sources."""


class EvaluationError(EvomergeError):
    """An evaluator cannot be built or run."""


def validation_message(exc: "ValidationError") -> str:  # noqa: F821 - pydantic imported lazily
    """The first pydantic error as ``field.path: message`` (one line)."""
    err = exc.errors()[0]
    skip = ("function-", "union[", "list[", "dict[", "tagged-union[")
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(skip) and str(p) not in _TYPE_TAGS)
    if err["type"] == "missing":
        msg = "missing required field"
    elif err["type"] == "extra_forbidden":
        msg = "unknown field"
    else:
        msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


_TYPE_TAGS = {"bool", "int", "float", "str", "ConditionalParameter", "SearchedParameter", "list", "dict"}


class SearchStopped(EvomergeError):
    """A search stopped before its budget because its trials kept failing (exit code 1)."""

    exit_code = 1
