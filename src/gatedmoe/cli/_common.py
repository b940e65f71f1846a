"""What every subcommand shares: the one way a user mistake ends (`UsageError`: one line on
stderr, exit status 2, no traceback), argument types that refuse bad numbers while parsing,
and the checks that run before any work (device present, output folder writable)."""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path

__all__ = [
    "UsageError",
    "Parser",
    "positive_int",
    "nonneg_int",
    "positive_float",
    "nonneg_float",
    "check_k",
    "check_heads",
    "check_device",
    "prepare_out",
    "check_file",
    "read_text",
    "examples",
    "HELP_FORMAT",
]

# Every subcommand's --help: the description and the examples as written (line breaks kept).
HELP_FORMAT = argparse.RawDescriptionHelpFormatter


def examples(*commands: str) -> str:
    """The ``--help`` epilog of a subcommand: ``commands`` (``"gatedmoe ...  # why"``), one a line."""
    return "examples:\n" + "\n".join(f"  {c}" for c in commands)


class UsageError(SystemExit):
    """A user mistake: `gatedmoe.cli.main.main` prints ``gatedmoe <command>: error: <message>``
    on one line of stderr and the process exits with status 2 (argparse's status for bad
    usage). ``str(err)`` is the message."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``prog: error: message``; ``--help``
    names the usage) and exit with status 2."""

    def error(self, message: str):  # noqa: D102 (argparse's signature)
        raise UsageError(f"{message} (see {self.prog} --help)")


def _int_at_least(low: int, what: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
        return v

    parse.__name__ = "integer"
    return parse


def _float_check(strict: bool):
    import math

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not math.isfinite(v) or v < 0 or (strict and v == 0):
            raise argparse.ArgumentTypeError(f"must be a finite number {'> 0' if strict else '>= 0'}, got {s}")
        return v

    parse.__name__ = "number"
    return parse


positive_int = _int_at_least(1, ">= 1")
nonneg_int = _int_at_least(0, ">= 0")
positive_float = _float_check(strict=True)
nonneg_float = _float_check(strict=False)


def check_k(k: int, experts: int, source: str = "") -> None:
    """Refuse ``--k`` above the number of experts (`UsageError` naming both flags), before any
    work: the library's own message names its arguments, ``k`` and ``n_experts``. ``source``
    says where ``experts`` comes from when ``--experts`` was not given (e.g. "default")."""
    if k > experts:
        where = f" ({source})" if source else ""
        raise UsageError(f"--k {k} (experts per input) is more than --experts {experts}{where}; use --k <= {experts}")


def check_heads(d_model: int, n_heads: int, flag: str = "--d-model") -> None:
    """Refuse a model width the attention heads do not divide (`UsageError` naming ``flag``),
    before any work: the library's message names ``d_model`` and ``n_heads``, not a flag."""
    if d_model % n_heads:
        raise UsageError(f"{flag} {d_model} must be a multiple of the {n_heads} attention heads")


def check_device(spec: str, flag: str = "--device"):
    """``torch.device(spec)``, refused up front (`UsageError` naming ``flag``) when it is not a
    device name or this machine does not have it."""
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"{flag} {spec!r} is not a device ({e}); use cpu or cuda") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {spec}: this machine has no CUDA device (torch {torch.__version__}); use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError(f"{flag} {spec}: MPS is not available here; use {flag} cpu")
    elif dev.type != "cpu":
        raise UsageError(f"{flag} {spec}: the gatedmoe commands run on cpu or cuda")
    return dev


def prepare_out(path: str | Path, flag: str = "--out") -> Path:
    """Create the output folder ``path`` and check that a file can be written in it, before
    any work: a run that would end unable to save its results stops here instead."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".gatedmoe-write-check-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{flag} {path} cannot be written: {e.strerror or e}") from None
    return path


def check_file(path: str | Path, flag: str) -> Path:
    """``path`` as a readable file, or a `UsageError` naming ``flag``."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{flag} {path} does not exist")
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder, not a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag} {path} cannot be read (permission denied)")
    return path


def read_text(path: str | Path, flag: str) -> str:
    """The UTF-8 text of ``path`` for a character-level language model, or a `UsageError`
    naming ``flag``: a missing file, a folder, bytes that are not UTF-8, or a text too short
    to train on (under 100 characters, or fewer than 2 distinct ones)."""
    path = check_file(path, flag)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{flag} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if len(set(text)) < 2 or len(text) < 100:
        raise UsageError(f"{flag} {path} has {len(text)} characters ({len(set(text))} distinct); "
                         "a language model needs at least 100 characters and 2 distinct ones")
    return text


def print_error(prog: str, message: str) -> None:
    """One line on stderr, as argparse writes its errors."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
