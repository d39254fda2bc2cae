"""Replacing an output all or nothing: a hidden staging sibling swapped in once complete (one atomic
``renameat2(RENAME_EXCHANGE)`` where the kernel offers it, else two renames), leftovers of killed runs
restored or removed, and a full disk reported as :class:`DiskFullError`. The rules are in
:mod:`.safety` and docs/safety.md."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

NEW_TAG = "nmperm-new"


OLD_TAG = "nmperm-old"


_RENAME_EXCHANGE = 2


_AT_FDCWD = -100


Note = Callable[[str], None]


class DiskFullError(OSError):
    """The disk filled up while nmperm wrote (a checkpoint, a learning state): where, and what is free."""


def _stderr_note(message: str) -> None:
    print(f"nmperm: {message}", file=sys.stderr)


def _absolute(path: str | os.PathLike) -> Path:
    """``path`` made absolute with symlinks resolved (the directory a rename would really touch)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


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
