"""Exceptions raised by the preprocessing package.

Every message names the offending file or value and says what was expected.
"""
from __future__ import annotations


class PreprocessingError(Exception):
    """Base class of all preprocessing errors."""


class ImageLoadError(PreprocessingError):
    """An image file is missing, unreadable, corrupt, too large or not an image."""


class ModelFileError(PreprocessingError):
    """A model file is missing, has the wrong checksum or does not match the expected architecture."""


class NoFaceError(PreprocessingError):
    """No face was found in an image."""


class FaceTooSmallError(PreprocessingError):
    """A face was found but it is smaller than the minimum size."""


class InvalidNameError(PreprocessingError):
    """A person or file name is not allowed (e.g. empty, path separators, reserved)."""
