"""Exceptions gradc raises for user mistakes.

Every error that a user can cause carries, where it is known, the DSL source location
(``filename``, ``lineno``) so that the CLI can print one ``file:line: message`` line.
"""

from __future__ import annotations


class GradcError(Exception):
    """Base class of every error gradc raises on purpose."""

    def __init__(self, message: str, *, filename: str | None = None, lineno: int | None = None):
        super().__init__(message)
        self.message = message
        self.filename = filename
        self.lineno = lineno

    def __str__(self) -> str:
        if self.filename and self.lineno:
            return f"{self.filename}:{self.lineno}: {self.message}"
        return self.message


class ShapeError(GradcError, ValueError):
    """Shapes do not agree: at trace time (an op's operands) or at call time (an argument)."""


class DTypeError(GradcError, TypeError):
    """An argument's dtype cannot be converted to the parameter's dtype without loss of meaning."""


class TraceError(GradcError, TypeError):
    """The kernel did something the tracer cannot record (e.g. ``if`` on a traced tensor)."""


class UnknownOpError(GradcError, AttributeError):
    """A kernel uses ``gradc.<name>`` for a name that gradc does not define."""


class DimensionError(ShapeError):
    """A named dimension is used where a concrete Python number is needed at trace time."""
