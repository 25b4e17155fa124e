"""One exception type for bad user input, and the command-line wrapper that turns it into one line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

#: Exit status of every command for bad input (files, flags, configs), as argparse uses.
EXIT_USAGE = 2


class UserInputError(ValueError):
    """Bad input from the user: the message is one line saying what, where and how to fix it."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag raises `UserInputError`: one line and exit status 2 through `run_cli`
    (plain argparse prints the whole usage block first). Sub-parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        raise UserInputError(f"{message} (see {self.prog} --help)")


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (for one-line errors), or "no details"."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else "no details"


def json_object(text: str, flag: str, what: str) -> dict:
    """A flag's JSON object, given inline (`'{"key": 1}'`) or as the path of a .json file; anything else
    is a `UserInputError` naming `flag`. `what` says what the object holds, for that message."""
    source = flag
    if not text.lstrip().startswith("{"):
        try:
            text, source = Path(text).read_text(encoding="utf-8"), f"{flag} {text}"
        except (OSError, UnicodeDecodeError):  # no such file, a folder, a name too long, a binary file
            shown = text if len(text) <= 80 else text[:77] + "..."
            raise UserInputError(f"{flag}: {shown!r} is neither a JSON object nor a readable .json file") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserInputError(f"{source}: invalid JSON ({err.msg} at char {err.pos})") from None
    if not isinstance(value, dict):
        raise UserInputError(f"{source}: must be a JSON object of {what}")
    return value


def configure_logging(main_process: bool) -> None:
    """A command's log: timestamped INFO lines on stdout from the main process (the others: errors only);
    accelerate's own chatter from warnings up. Errors for the user stay the one stderr line of `run_cli`."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO, stream=sys.stdout,
                        force=True)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    if not main_process:
        logging.getLogger().setLevel(logging.ERROR)


def stderr_line(text: str) -> None:
    """Write `text` and its newline to stderr in one write: print() writes them separately, so the lines of
    ranks sharing a stderr pipe (torchrun) could interleave into one."""
    sys.stderr.write(f"{text}\n")
    sys.stderr.flush()


def fail(message: str) -> NoReturn:
    """Print `error: message` on stderr and exit with status 2."""
    stderr_line(f"error: {message}")
    raise SystemExit(EXIT_USAGE)


_PACKAGE_DIR = Path(__file__).resolve().parent
_format_warning_default = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Our own warnings as one `warning: ...` line (Python's format adds the file, line and source code line,
    which say nothing to a command's user); everyone else's keep Python's format."""
    where = Path(filename).resolve()
    top_floor = where.name in ("train.py", "sample.py") and (where.parent / "latent_ddpm").is_dir()
    if where.is_relative_to(_PACKAGE_DIR) or top_floor or where == Path(sys.argv[0]).resolve():
        return f"warning: {message}\n"
    return _format_warning_default(message, category, filename, lineno, line)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a command's `main`, turning `UserInputError` into one line on stderr and exit status 2; the
    package's warnings print as one `warning: ...` line each."""
    warnings.formatwarning = _format_warning
    try:
        return main(argv) or 0
    except UserInputError as err:
        _close_progress_bars()
        fail(str(err))


def _close_progress_bars() -> None:
    """End open tqdm bars with their newline, so that the error starts a line of its own."""
    tqdm_module = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm_module, "tqdm", None), "_instances", ())):
        bar.close()
