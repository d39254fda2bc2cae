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
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
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
_FS_IOC_GETFLAGS = 0x80086601
_UNDELETABLE_FLAGS = {0x10: "immutable", 0x20: "append-only"}  # FS_IMMUTABLE_FL, FS_APPEND_FL
# the longest name nmperm puts beside the output: ``.NAME.nmperm-new-PID-TOKEN`` (a pid has up to 7 digits)
_STAGING_EXTRA = len(f"..{NEW_TAG}-{'9' * 7}-{'f' * 8}")

Note = Callable[[str], None]


class UnsafeOutputError(ValueError):
    """An output path nmperm refuses to create or replace (it would destroy something not its own)."""


class DiskFullError(OSError):
    """The disk filled up while nmperm wrote (a checkpoint, a learning state): where, and what is free."""


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


def is_nmperm_output(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds an ``nmperm.json`` of this project's format (it claims nmperm wrote
    it; :func:`foreign_entries` checks the claim file by file)."""
    return _sidecar_data(Path(directory)) is not None


def _sidecar_data(directory: Path) -> dict | None:
    try:
        data = json.loads((directory / SIDECAR_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ours = isinstance(data, dict) and str(data.get("format", "")).startswith(FORMAT_PREFIX)
    return data if ours else None


_HASHES: dict[tuple, str] = {}  # (path, device, inode, size, mtime_ns) -> sha256: each file hashed once a run


def file_sha256(path: Path) -> str:
    """The sha256 of ``path``'s bytes (cached for an unchanged file)."""
    info = os.stat(path)
    key = (str(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def written_files(directory: str | os.PathLike) -> dict[str, dict]:
    """``relative path -> {"size", "sha256"}`` of every file in ``directory`` but ``nmperm.json``: what
    the sidecar records as written by nmperm (the ownership record :func:`foreign_entries` reads)."""
    root = Path(directory)
    files = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if relative == SIDECAR_NAME or path.is_dir() and not path.is_symlink():
            continue
        files[relative] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return files


def foreign_entries(directory: Path) -> tuple[list[str], str]:
    """What in ``directory`` nmperm did not write, and why it says so: every entry but ``nmperm.json``
    must be a plain file (or a folder of them) listed in the sidecar's ``files`` with the same size and
    sha256. ``([], "")`` when nmperm wrote all of it."""
    data = _sidecar_data(directory)
    entries = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))
    if data is None:
        return entries, f"it holds no {SIDECAR_NAME} of nmperm's format"
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        return [e for e in entries if e != SIDECAR_NAME], (
            f"its {SIDECAR_NAME} lists no files nmperm wrote (written by an older nmperm, or edited)"
        )
    foreign = []
    for relative in entries:
        path = directory / relative
        if relative == SIDECAR_NAME or (path.is_dir() and not path.is_symlink()):
            continue
        entry = files.get(relative)
        if not isinstance(entry, dict) or path.is_symlink() or not path.is_file():
            foreign.append(relative)
        elif path.stat().st_size != entry.get("size") or file_sha256(path) != entry.get("sha256"):
            foreign.append(f"{relative} (changed since nmperm wrote it)")
    count = f"{len(foreign)} of its entries {'is' if len(foreign) == 1 else 'are'}"
    return foreign, f"{count} not a file nmperm wrote (listed in {SIDECAR_NAME})"


def _undeletable(directory: Path) -> list[str]:
    """Entries of ``directory`` (itself included) that could not be deleted: immutable or append-only
    (``chattr``), or in a folder this process may not write."""
    found = []
    for path in [directory, *sorted(directory.rglob("*"))]:
        flags = _inode_flags(path)
        named = [word for bit, word in _UNDELETABLE_FLAGS.items() if flags & bit]
        if path.is_dir() and not path.is_symlink() and not os.access(path, os.W_OK | os.X_OK):
            named.append("a folder this user may not write")
        if named:
            found.append(f"{path.relative_to(directory.parent)} ({', '.join(named)})")
    return found


def _inode_flags(path: Path) -> int:
    """Linux inode flags of ``path`` (``lsattr``), 0 where they cannot be read."""
    if path.is_symlink() or not (path.is_file() or path.is_dir()):
        return 0
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return 0
    try:
        return int.from_bytes(fcntl.ioctl(descriptor, _FS_IOC_GETFLAGS, bytes(8))[:4], sys.byteorder)
    except OSError:
        return 0
    finally:
        os.close(descriptor)


def _free_bytes(path: Path) -> int | None:
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    try:
        info = os.statvfs(ancestor)
    except OSError:
        return None
    return info.f_bavail * info.f_frsize


def _size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def check_free_space(output: str | os.PathLike, needed: int, what: str = "the checkpoint") -> None:
    """Refuse (:class:`DiskFullError`) before the work when ``output``'s filesystem has less than
    ``needed`` bytes free (plus 5%)."""
    target = _absolute(output)
    free = _free_bytes(target.parent)
    if free is not None and free < needed * 1.05:
        raise DiskFullError(
            f"not enough space for {what} at {target}: it needs about {_size(needed)} and {_size(free)} are free on "
            f"that filesystem; free some space or choose another --output"
        )


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or what it was raised from) is a full disk: ``ENOSPC``/``EDQUOT``, or the same
    reported by a library as text (safetensors' ``StorageFull``, torch's stream writer)."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if any(words in text for words in ("No space left on device", "StorageFull", "os error 28", "Disk quota")):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def disk_full_error(error: BaseException, where: Path, what: str) -> DiskFullError:
    free = _free_bytes(where)
    return DiskFullError(
        f"the disk filled up while writing {what} in {where} ({'unknown' if free is None else _size(free)} free): "
        "free some space or choose another --output, then rerun"
    )


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
        try:
            _remove_ours(entry, target)
        except OSError as error:
            say(
                f"could not remove {entry}, left by an earlier nmperm run ({error.strerror}: {error.filename}): "
                "delete it yourself"
            )
            continue
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


def swap_in(staging: Path, target: Path, note: Note | None = None) -> None:
    """Make the complete directory ``staging`` the output ``target``; the old output is deleted only
    after the new one is in place. Once it is, the write has succeeded: an old copy that cannot be
    deleted is renamed to its aside name and named (``note``), not raised."""
    if not os.path.lexists(target):
        os.rename(staging, target)
        return
    if _exchange(staging, target):  # target: new; staging: old
        _discard_old(staging, target, note)
        return
    aside = _sibling(target, OLD_TAG)
    os.rmdir(aside)
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside, target)
        raise
    _discard_old(aside, target, note)


def _discard_old(old: Path, target: Path, note: Note | None) -> None:
    """Delete the replaced output ``old`` (a staging or aside name of ``target``); a failure is a warning
    naming what is left, under an aside name the next run tries again."""
    try:
        _remove_ours(old, target)
    except OSError as error:
        kept = old
        if NEW_TAG in old.name:  # after the exchange the old output has the staging name: name it as old
            kept = _sibling(target, OLD_TAG)
            os.rmdir(kept)
            try:
                os.rename(old, kept)
            except OSError:
                kept = old
        (note or _stderr_note)(
            f"{target} now holds the new checkpoint; the previous one could not be deleted entirely "
            f"({error.strerror}: {error.filename}) and what is left of it is in {kept}: delete it yourself"
        )


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
