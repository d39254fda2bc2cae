"""Where nmperm may write, and how it replaces an output: the one place that decides.

The rule (docs/safety.md):

- ``--output`` must not be, or contain, the filesystem root, the home directory, the current
  directory, or any input of the run (the model, the datasets, the recipe), nor lie inside an input
  directory. Paths are compared by device and inode as well as by name (a bind mount or a hard link
  is caught). Refused before any work.
- An existing non-empty output is replaced only with ``overwrite`` and only when every file in it is
  one nmperm wrote: listed in its ``nmperm.json`` (``files``: name, size, sha256) and unchanged.
  Anything else in it is named and the run is refused. An empty directory may be replaced.
- Its name must be valid UTF-8 and short enough for the staging names beside it; its parent must be
  creatable and writable; every file of an old output must be deletable: checked before any work.
- The new checkpoint is written into a hidden sibling staging directory
  (``.NAME.nmperm-new-PID-TOKEN``) and swapped in only once complete: by one atomic
  ``renameat2(RENAME_EXCHANGE)`` where the kernel offers it, else by renaming the old output aside
  (``.NAME.nmperm-old-PID-TOKEN``), renaming the new one in and deleting the old one. A run killed
  at any point leaves the old or the new complete output at the path, or (only in the second
  scheme, between its two renames) the old one aside, which the next run restores.
- Leftover staging and aside directories of dead runs are removed (or restored) by the next run.
- Directories are created with mode ``0o777`` minus the umask, like ``mkdir``.
- Once the new output is in place the write has succeeded: an old copy that cannot be deleted is
  left under its aside name and named in a warning, never reported as a failed write.
- A full disk is a :class:`DiskFullError` saying where and how much is free, not an unexpected error.

Nothing here deletes a directory whose name is not one of the two staging names above.

This module checks the output before any work (:func:`check_output`) and writes it
(:func:`atomic_write`); :mod:`.ownership` decides which files of an old output nmperm wrote, and
:mod:`.replace` swaps the new one in.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from .ownership import _undeletable, foreign_entries, is_nmperm_output
from .replace import (
    NEW_TAG,
    Note,
    _absolute,
    _sibling,
    disk_full_error,
    is_disk_full,
    recover_leftovers,
    swap_in,
)
from .sidecar import SIDECAR_NAME

# the longest name nmperm puts beside the output: ``.NAME.nmperm-new-PID-TOKEN`` (a pid has up to 7 digits)
_STAGING_EXTRA = len(f"..{NEW_TAG}-{'9' * 7}-{'f' * 8}")


class UnsafeOutputError(ValueError):
    """An output path nmperm refuses to create or replace (it would destroy something not its own)."""


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def protected_paths(inputs: Iterable[tuple[str, str | os.PathLike | None]] = ()) -> list[tuple[str, Path]]:
    """``(label, absolute path)`` of everything an output may never be or contain: the filesystem
    root, the home directory, the current directory and the given ``(label, path)`` inputs
    (a ``builtin:`` dataset or ``None`` is skipped)."""
    protected = [("the filesystem root", Path(os.path.abspath(os.sep)))]
    home = os.path.expanduser("~")
    if home and home != "~":
        protected.append(("the home directory", _absolute(home)))
    protected.append(("the current directory", _absolute(os.getcwd())))
    for label, path in inputs:
        if path is None or str(path) == "" or str(path).startswith("builtin:"):
            continue
        protected.append((label, _absolute(path)))
    return protected


def _identity(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of an existing path (symlinks followed), else None."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def _relation(target: Path, path: Path, is_input: bool) -> str | None:
    """How ``target`` stands to the protected ``path``: ``is``, ``contains`` or (an input directory)
    ``is inside``; None when it does neither. Compared by name and by device and inode, so that a bind
    mount, a hard-linked directory or another spelling of the same directory is caught."""
    if target == path:
        return "is"
    if _contains(target, path):
        return "contains"
    if is_input and _contains(path, target):
        return "is inside"
    mine = _identity(target)
    if mine is not None:
        if _identity(path) == mine:
            return "is"
        if any(_identity(above) == mine for above in path.parents):
            return "contains"
    if is_input and (theirs := _identity(path)) is not None:
        if any(_identity(above) == theirs for above in target.parents):
            return "is inside"
    return None


def guard_output(output: str | os.PathLike | None, inputs: Iterable[tuple[str, str | os.PathLike | None]] = ()) -> Path:
    """The absolute output path, or :class:`UnsafeOutputError` when it is or contains a protected path
    (see :func:`protected_paths`) or lies inside an input directory. Touches nothing on disk."""
    text = "" if output is None else os.fspath(output)
    if not str(text).strip():
        raise UnsafeOutputError("--output is empty: give the directory to write the checkpoint to")
    target = _absolute(text)
    inputs = list(inputs)
    fixed = len(protected_paths())
    for index, (label, path) in enumerate(protected_paths(inputs)):
        relation = _relation(target, path, is_input=index >= fixed)
        if relation is None:
            continue
        hint = " (an unset variable in --output $VAR/ gives /)" if label == "the filesystem root" else ""
        if relation == "is inside":
            raise UnsafeOutputError(
                f"refusing output {target}: it is inside {label} ({path}); nmperm never writes into its inputs: "
                "choose a new directory outside it, e.g. a sibling of the model"
            )
        raise UnsafeOutputError(
            f"refusing output {target}: it {relation} {label} ({path}){hint}; nmperm never replaces a directory "
            "that holds its inputs or yours: choose a new directory, e.g. a sibling of the model"
        )
    return target


def check_name(target: Path) -> None:
    """Refuse an output name that nmperm could not write beside it: not valid UTF-8 (the tokenizer
    and safetensors writers need UTF-8 paths), or too long for its staging name
    (``.NAME.nmperm-new-PID-TOKEN``) or its learning state (``NAME.nmperm-state``)."""
    try:
        os.fsdecode(os.fsencode(target)).encode("utf-8")
    except UnicodeError:
        raise UnsafeOutputError(
            f"refusing output {os.fsencode(target)!r}: its name is not valid UTF-8, which the tokenizer and "
            "safetensors writers need; choose a name of UTF-8 characters"
        ) from None
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    try:
        limit = os.pathconf(ancestor, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in target.parts[1:]:
        length = len(os.fsencode(part)) + (_STAGING_EXTRA if part == target.name else 0)
        if length > limit:
            allowed = limit - (_STAGING_EXTRA if part == target.name else 0)
            raise UnsafeOutputError(
                f"refusing output {target}: the name {part[:40]}... is {len(os.fsencode(part))} bytes, and this "
                f"filesystem allows {limit} per name"
                + (
                    f", of which nmperm needs {_STAGING_EXTRA} for the staging name beside it"
                    if part == target.name
                    else ""
                )
                + f": use a name of at most {allowed} bytes"
            )


def _check_creatable(target: Path) -> None:
    """Refuse an output whose parent cannot be created or written (checked with a real probe)."""
    ancestor = target.parent
    while not ancestor.exists():
        if os.path.lexists(ancestor):  # a dangling symlink
            raise UnsafeOutputError(f"cannot create output {target}: {ancestor} is a broken symbolic link")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UnsafeOutputError(f"cannot create output {target}: {ancestor} is a file, not a directory")
    probe = ancestor / f".nmperm-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as error:
        raise UnsafeOutputError(
            f"cannot write output {target}: {ancestor} is not writable ({error.strerror}); choose another --output"
        ) from None


def check_output(
    output: str | os.PathLike | None,
    overwrite: bool,
    inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
    note: Note | None = None,
) -> Path:
    """Everything about ``output`` that can be checked before the work; returns its absolute path.

    Raises :class:`UnsafeOutputError` (protected path, replaceable only if nmperm wrote it, not
    creatable or writable) or ``FileExistsError`` (non-empty without ``overwrite``, or a file).
    Cleans up leftovers of killed runs (:func:`recover_leftovers`).
    """
    inputs = list(inputs)
    target = guard_output(output, inputs)
    check_name(target)
    recover_leftovers(target, note)
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"output {target} exists and is not a directory: choose another --output")
        contents = sorted(p.name for p in target.iterdir())
        if contents and not overwrite:
            raise FileExistsError(
                f"output directory {target} is not empty: pass --overwrite to replace it, or pick another"
            )
        if contents and not is_nmperm_output(target):
            shown = ", ".join(contents[:3]) + (", ..." if len(contents) > 3 else "")
            raise UnsafeOutputError(
                f"refusing to overwrite {target}: --overwrite replaces only a directory nmperm wrote (one holding "
                f"{SIDECAR_NAME}) or an empty one, and it holds {len(contents)} other entries ({shown}); "
                "delete it yourself if you mean it, or choose another --output"
            )
        foreign, why = foreign_entries(target) if contents else ([], "")
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise UnsafeOutputError(
                f"refusing to overwrite {target}: --overwrite replaces only files nmperm wrote (listed with their "
                f"checksums in {SIDECAR_NAME}), and {why}: {shown}; move those out (or delete the directory yourself "
                "if you mean it), or choose another --output"
            )
        stuck = _undeletable(target) if contents else []
        if stuck:
            raise UnsafeOutputError(
                f"cannot replace {target}: {', '.join(stuck[:3])} cannot be deleted, so the old output could not be "
                "removed after the new one is in place; fix that (e.g. chattr -i, chmod u+w) or choose another --output"
            )
    _check_creatable(target)
    return target


def atomic_write(
    output: str | os.PathLike,
    write: Callable[[Path], None],
    overwrite: bool,
    inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
    note: Note | None = None,
) -> Path:
    """Run ``write(staging)`` to fill a fresh sibling staging directory, then swap it in as ``output``.

    The checks of :func:`check_output` run again first (the disk may have changed during the work).
    If ``write`` raises (or the process is interrupted), the staging directory is deleted and the old
    output is untouched. Returns the output's absolute path.
    """
    target = check_output(output, overwrite, inputs, note)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, NEW_TAG)
    try:
        write(staging)
    except BaseException as error:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, Exception) and is_disk_full(error):
            raise disk_full_error(error, target.parent, f"the new checkpoint for {target}") from error
        raise
    try:
        swap_in(staging, target, note)
    except BaseException:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
