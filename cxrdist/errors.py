"""Errors we know how to explain. The CLI turns each into a one-line message and a non-zero exit."""


class CxrdistError(Exception):
    """Base class: the message is a complete sentence that names the thing and what to do."""

    reported = False  # True once the line was printed where it was raised (see `report_now`)


def write_line(text: str) -> None:
    """`text` on stderr as one line of its own, at once: below a progress bar still on the line, and in one write,
    so the lines several ranks print at the same moment never run into each other.

    On a terminal tqdm clears its bar first. In a log (a file, a pipe: a bar forced there, or a library's own bar)
    that clearing is a carriage return, which leaves the bar's text at the start of the log's line: the line
    then starts with a newline of its own, so a reader that splits the log on newlines finds it whole."""
    import sys

    from tqdm import tqdm

    with tqdm.external_write_mode(file=sys.stderr):
        # tqdm keeps its open bars in a class-level set; external_write_mode walks the same set
        under_bar = any(not getattr(bar, "disable", False) and getattr(bar, "fp", None) is not None
                        and not _is_terminal(bar.fp) for bar in list(getattr(tqdm, "_instances", ())))
        sys.stderr.write(("\n" if under_bar else "") + text + "\n")
        sys.stderr.flush()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def report_now(error: CxrdistError) -> CxrdistError:
    """Print the error's one line to stderr at once and mark it printed, then return it for `raise`.

    For errors raised while a launcher may be stopping this process (a peer died, a rank saw a NaN loss):
    `accelerate launch` SIGTERMs the surviving ranks as soon as one fails, and a line left for the CLI to print
    on the way out can be lost in that race.
    """
    write_line(f"Error: {error}")
    error.reported = True
    return error


class ConfigError(CxrdistError):
    """Bad config key, type or value."""


class DataError(CxrdistError):
    """Missing/corrupt shards or inputs, fold out of range, size mismatch, checksum mismatch."""


class ModelError(CxrdistError):
    """Missing model path, incompatible adapter, unknown preset."""


class InputError(CxrdistError):
    """Bad user input at the command line (empty prompt, bad output path, ...)."""
