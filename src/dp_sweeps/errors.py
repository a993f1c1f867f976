"""One exception type for input that must be refused before any training starts."""


class ConfigError(ValueError):
    """Bad input. ``str(err)`` is one line that names the bad value; the entrypoint
    prints it and exits non-zero, leaving no ``result.json`` behind."""
