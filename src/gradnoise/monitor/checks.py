"""Argument checks shared by the Monitor and ``gradnoise profile``; each raises before any state
changes, with an expected / got / fix message."""

from __future__ import annotations

import tempfile
from pathlib import Path

from gradnoise.errors import GradNoiseError, explain

__all__ = ["check_batch_size", "check_every", "check_out_dir"]


def _out_error(path: Path, got: str, fix: str) -> GradNoiseError:
    return GradNoiseError(
        explain("output directory", expected="a directory (existing or new)", got=got, fix=fix)
    )


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.absolute().parents):
        if candidate.exists():
            return candidate
    return Path("/")  # pragma: no cover - the root always exists


def check_out_dir(out: str | Path, *, create: bool = True) -> Path:
    """``out`` as a Path, created if missing (unless ``create=False``); refuses a file, a path
    under a file and a directory that cannot be written, before anything is written."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise _out_error(
            path,
            f"{str(path)!r}, which is a file",
            "pass a directory path with --out / out=, or remove the file",
        )
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise _out_error(
            path,
            f"{str(path)!r}, which lies under the file {str(existing)!r}",
            "pass a directory path with --out / out= that is not inside a file",
        )
    if not create:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise _out_error(
            path,
            f"{str(path)!r}, which cannot be written ({error.strerror or error})",
            "pass a directory you can write to with --out / out=, or fix its permissions",
        ) from error
    return path


def check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 2:
        raise GradNoiseError(
            explain(
                "--batch-size",
                expected="an int >= 2 (a gradient variance needs two examples)",
                got=repr(batch_size),
                fix="pass --batch-size 2 or more",
            )
        )


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
