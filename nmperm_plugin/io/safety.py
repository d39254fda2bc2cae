"""Where nmperm may write, and how it replaces an output: the one place that decides.

The rule (docs/safety.md):

- ``--output`` must not be, or contain, the filesystem root, the home directory, the current
  directory, or any input of the run (the model, the datasets, the recipe). Refused before any work.
- An existing non-empty output is replaced only with ``overwrite`` and only when nmperm wrote it
  (it holds an ``nmperm.json`` of this project's format). An empty directory may be replaced.
- The output's parent must be creatable and writable: checked before any work.
- The new checkpoint is written into a hidden sibling staging directory
  (``.NAME.nmperm-new-PID-TOKEN``) and swapped in only once complete: by one atomic
  ``renameat2(RENAME_EXCHANGE)`` where the kernel offers it, else by renaming the old output aside
  (``.NAME.nmperm-old-PID-TOKEN``), renaming the new one in and deleting the old one. A run killed
  at any point leaves the old or the new complete output at the path, or (only in the second
  scheme, between its two renames) the old one aside, which the next run restores.
- Leftover staging and aside directories of dead runs are removed (or restored) by the next run.
- Directories are created with mode ``0o777`` minus the umask, like ``mkdir``.

Nothing here deletes a directory whose name is not one of the two staging names above.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from .sidecar import FORMAT_PREFIX, SIDECAR_NAME

NEW_TAG = "nmperm-new"
OLD_TAG = "nmperm-old"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100

Note = Callable[[str], None]


class UnsafeOutputError(ValueError):
    """An output path nmperm refuses to create or replace (it would destroy something not its own)."""


def _stderr_note(message: str) -> None:
    print(f"nmperm: {message}", file=sys.stderr)


def _absolute(path: str | os.PathLike) -> Path:
    """``path`` made absolute with symlinks resolved (the directory a rename would really touch)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


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


def guard_output(output: str | os.PathLike | None, inputs: Iterable[tuple[str, str | os.PathLike | None]] = ()) -> Path:
    """The absolute output path, or :class:`UnsafeOutputError` when it is or contains a protected path
    (see :func:`protected_paths`). Touches nothing on disk."""
    text = "" if output is None else os.fspath(output)
    if not str(text).strip():
        raise UnsafeOutputError("--output is empty: give the directory to write the checkpoint to")
    target = _absolute(text)
    for label, path in protected_paths(inputs):
        if _contains(target, path):
            relation = "is" if target == path else "contains"
            hint = " (an unset variable in --output $VAR/ gives /)" if label == "the filesystem root" else ""
            raise UnsafeOutputError(
                f"refusing output {target}: it {relation} {label} ({path}){hint}; nmperm never replaces a directory "
                "that holds its inputs or yours: choose a new directory, e.g. a sibling of the model"
            )
    return target


def is_nmperm_output(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds an ``nmperm.json`` of this project's format (nmperm wrote it)."""
    sidecar = Path(directory) / SIDECAR_NAME
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith(FORMAT_PREFIX)


def _leftover(target: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(target.name)}\.({NEW_TAG}|{OLD_TAG})-(\d+)-[0-9a-f]{{8}}")


def _legacy_staging(target: Path) -> re.Pattern:
    """``tempfile.mkdtemp(prefix='.NAME.')`` names used before this module (reported, never deleted)."""
    return re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_ours(path: Path, target: Path) -> None:
    """Delete a staging or aside directory of ``target``; refuses any other name."""
    if path.parent != target.parent or not _leftover(target).fullmatch(path.name):
        raise RuntimeError(f"bug: refusing to delete {path}, which is not an nmperm staging directory of {target}")
    shutil.rmtree(path)


def recover_leftovers(output: str | os.PathLike, note: Note | None = None) -> list[str]:
    """Clean up after killed runs that wrote ``output``: restore an aside (old) output when the output
    path is missing, delete the other staging and aside directories of dead processes. Returns the
    messages (also passed to ``note``)."""
    note = note or _stderr_note
    target = _absolute(output)
    messages: list[str] = []

    def say(message: str) -> None:
        messages.append(message)
        note(message)

    try:
        entries = sorted(target.parent.iterdir(), key=lambda p: p.name) if target.parent.is_dir() else []
    except OSError:
        return messages
    ours = _leftover(target)
    found = [(e, ours.fullmatch(e.name)) for e in entries]
    leftovers = [(e, m.group(1), int(m.group(2))) for e, m in found if m]
    for entry, _, pid in leftovers:
        if _alive(pid):
            say(f"{entry} belongs to running process {pid}: left alone")
    dead = [(e, tag) for e, tag, pid in leftovers if not _alive(pid)]
    olds = sorted((e for e, tag in dead if tag == OLD_TAG), key=lambda p: p.stat().st_mtime, reverse=True)
    if olds and not os.path.lexists(target):
        os.rename(olds[0], target)
        say(f"restored {target} from {olds[0].name}, left by an interrupted run between its two renames")
        olds = olds[1:]
    for entry in [*olds, *(e for e, tag in dead if tag == NEW_TAG)]:
        _remove_ours(entry, target)
        say(f"removed {entry}, left by an interrupted nmperm run")
    legacy = _legacy_staging(target)
    for entry in entries:
        if legacy.fullmatch(entry.name) and entry.is_dir() and (entry / "config.json").exists():
            say(f"{entry} looks like a staging directory left by an older nmperm: delete it if you do not need it")
    return messages


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
    _check_creatable(target)
    return target


def _sibling(target: Path, tag: str) -> Path:
    """Create a new hidden sibling directory of ``target`` (mode 0o777 minus the umask)."""
    while True:
        path = target.parent / f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def swap_in(staging: Path, target: Path) -> None:
    """Make the complete directory ``staging`` the output ``target``; the old output is deleted only
    after the new one is in place."""
    if not os.path.lexists(target):
        os.rename(staging, target)
        return
    if _exchange(staging, target):  # target: new; staging: old
        _remove_ours(staging, target)
        return
    aside = _sibling(target, OLD_TAG)
    os.rmdir(aside)
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside, target)
        raise
    _remove_ours(aside, target)


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
        swap_in(staging, target)
    except BaseException:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
