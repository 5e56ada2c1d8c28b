"""Error types. Every error a user can cause derives from :class:`FastImpactError`.

Subclasses also inherit the matching builtin so callers can catch ``ValueError`` or
``OSError`` as usual. Messages are one line: the problem, the value, and the fix.
"""


class FastImpactError(Exception):
    """Base class of all fastimpact errors (the CLI prints these as one line)."""


class ConfigError(FastImpactError, ValueError):
    """An invalid option or parameter value."""


class ImageIOError(FastImpactError, OSError):
    """A file that cannot be read or written."""


class ImageError(FastImpactError, ValueError):
    """An image whose content cannot be registered (NaN, constant, not 3-D, ...)."""


class RegistrationError(FastImpactError, RuntimeError):
    """The registration cannot proceed (too few samples, disjoint masks, ...)."""


class BackendError(FastImpactError, RuntimeError):
    """A requested compute backend is not available."""
