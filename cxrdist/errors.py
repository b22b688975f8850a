"""Errors we know how to explain. The CLI turns each into a one-line message and a non-zero exit."""


class CxrdistError(Exception):
    """Base class: the message is a complete sentence that names the thing and what to do."""


class ConfigError(CxrdistError):
    """Bad config key, type or value."""


class DataError(CxrdistError):
    """Missing/corrupt shards or inputs, fold out of range, size mismatch, checksum mismatch."""


class ModelError(CxrdistError):
    """Missing model path, incompatible adapter, unknown preset."""


class InputError(CxrdistError):
    """Bad user input at the command line (empty prompt, bad output path, ...)."""
