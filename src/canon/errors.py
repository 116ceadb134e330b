"""Errors a user can act on: the command line prints their message alone, without a
traceback, and each also derives from the builtin a library user would catch (ValueError,
LookupError, ...)."""


class CanonError(Exception):
    """Base of every error whose message tells the user what to do."""


class ConfigError(CanonError, ValueError):
    """A bad value or key in a recipe, a flag or a model argument."""


class InputSizeError(CanonError, ValueError):
    """An input too small (or of the wrong size) for a model's head."""


class DataError(CanonError, OSError):
    """A missing, corrupt or badly laid-out dataset, image or checkpoint file."""


class NonFiniteError(CanonError, ArithmeticError):
    """The loss or the weights became NaN or infinite; the message names the step and the
    newest checkpoint (always a finite one) to go back to."""


def first_line(error: Exception) -> str:
    """An error as one line to put in a message of canon's: its kind and first line, and the
    next one where the first ends in a colon (torch's "Error(s) in loading state_dict for X:"
    says nothing of the keys at fault until its second line)."""
    lines = [line.strip() for line in str(error).strip().splitlines()]
    if not lines:
        return type(error).__name__
    text = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return f"{type(error).__name__}: {text[:300]}"


def canon_message(error: CanonError) -> str:
    """The message canon wrote. One raised in a DataLoader worker comes back from torch
    wrapped in the worker's traceback ("Caught DataError in DataLoader worker process 0 ...");
    the message is its last part, after the error's qualified name."""
    text = str(error)
    if not text.startswith("Caught ") or "\nOriginal Traceback" not in text:
        return text
    marker = f"\n{type(error).__module__}.{type(error).__qualname__}: "
    return text.rpartition(marker)[2].strip() if marker in text else text
