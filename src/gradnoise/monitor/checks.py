"""Argument checks shared by the Monitor and ``gradnoise profile``; each raises before any state
changes, with an expected / got / fix message."""

from __future__ import annotations

from pathlib import Path

from gradnoise.errors import GradNoiseError, explain

__all__ = ["check_every", "check_out_dir"]


def check_out_dir(out: str | Path) -> Path:
    """``out`` as a Path, created if missing; refuses an existing file."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise GradNoiseError(
            explain(
                "output directory",
                expected="a directory (existing or new)",
                got=f"{str(path)!r}, which is a file",
                fix="pass a directory path with --out / out=, or remove the file",
            )
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_every(every: int) -> None:
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise GradNoiseError(
            explain(
                "every",
                expected="an int >= 1 (measure one step in `every`)",
                got=repr(every),
                fix="pass every=40 (the default) or another positive int",
            )
        )
