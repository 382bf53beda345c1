"""Exceptions raised for bad input and unreachable resources.

Every error a user can cause derives from :class:`VocabsegError`, so the command line, the web
server and batch jobs can report it as a message (and carry on with other inputs) instead of a
traceback, while genuine bugs still surface as ordinary exceptions.
"""

from __future__ import annotations


class VocabsegError(Exception):
    """Base class of the errors caused by the caller's input or environment."""


class VocabularyError(VocabsegError, ValueError):
    """An empty, duplicate or malformed class list."""


class ImageLoadError(VocabsegError, ValueError):
    """A file that is not an image, or an unreadable or truncated one."""


class ImageTooLargeError(ImageLoadError):
    """An image above the configured pixel limit (refused before it is decoded)."""


class WeightsUnavailableError(VocabsegError, RuntimeError):
    """Pretrained weights could not be found locally nor downloaded."""


class UnknownNameError(VocabsegError, KeyError):
    """A method, model, VFM or template-set name that is not registered."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class DatasetLayoutError(VocabsegError, ValueError):
    """A dataset folder that is missing, incomplete or not in the expected on-disk layout."""


class MethodOptionError(VocabsegError, ValueError):
    """An option a method does not take, or a combination of options that cannot work."""


class CheckpointError(VocabsegError, RuntimeError):
    """A trained checkpoint that is missing, incomplete, corrupt or for another model."""


class SettingsError(VocabsegError, ValueError):
    """An inference or run setting outside its allowed values."""


class SegmentationFailedError(VocabsegError, RuntimeError):
    """An unexpected error while segmenting one image of a batch, reported as that image's outcome
    (the original exception is its ``__cause__``) so the rest of the batch goes on."""
