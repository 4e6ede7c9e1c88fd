"""Errors that name the file and the problem."""

from __future__ import annotations


class EraserFileError(ValueError):
    """An eraser or stack file cannot be used. ``str(err)`` is a message for the user."""

    def __init__(self, path, problem: str):
        self.path = str(path) if path is not None else "<in memory>"
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class IncompatibleModelError(EraserFileError):
    """The file is fine, but it was made for another base model (family, shapes, text encoder)."""


class UnsupportedEraser(NotImplementedError):
    """No host path applies this eraser here (an unregistered method, or a combination the path cannot
    follow). Raised instead of generating without it."""
