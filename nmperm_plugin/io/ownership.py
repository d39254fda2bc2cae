"""Which files of an existing output nmperm wrote: the sidecar's ``files`` record (name, size,
sha256), compared with what is there; and whether an old output can be deleted at all (immutable or
append-only files, folder permissions). The rules are in :mod:`.safety` and docs/safety.md."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path

from .sidecar import FORMAT_PREFIX, SIDECAR_NAME

_FS_IOC_GETFLAGS = 0x80086601


_UNDELETABLE_FLAGS = {0x10: "immutable", 0x20: "append-only"}  # FS_IMMUTABLE_FL, FS_APPEND_FL
# the longest name nmperm puts beside the output: ``.NAME.nmperm-new-PID-TOKEN`` (a pid has up to 7 digits)


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
