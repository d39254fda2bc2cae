"""The sidecar file written beside every checkpoint: permutations, pattern and measured figures."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..core.nm import NMPattern

SIDECAR_NAME = "nmperm.json"
FORMAT_PREFIX = "nmperm-sidecar/"
FORMAT = "nmperm-sidecar/2"  # 2: adds ``checksums`` (sha256 of every pruned weight as written)
FORMATS = ("nmperm-sidecar/1", FORMAT)


@dataclass
class Sidecar:
    """What a checkpoint's N:M structure is and how to recover it.

    ``frames`` maps every pruned linear to the permutation site whose permutation makes its stored
    weight N:M (``W[:, permutations[site]]``), or to ``None`` when the stored weight itself is N:M
    (``fold: exact``: permutations are folded into the weights). In ``fold: gather`` checkpoints the
    weights stay in the original channel order, so stock loaders compute the right function, and
    serving code re-applies the gathers (see :func:`nmperm_plugin.learn.fold.apply_gather`).

    ``checksums`` (format 2) maps every pruned linear to ``{"sha256", "dtype", "shape"}`` of its
    weight's bytes in the written safetensors files, recorded at write time; ``nmperm verify``
    compares them. Format 1 sidecars have none; in format 2 the key is required.

    What the checkpoint claims, which ``nmperm verify`` checks against the model: ``masked`` (False: the
    permutations only, no N:M mask: not an N:M checkpoint), ``dense`` (the linears the adapter permutes
    that were left dense on purpose, e.g. by ``ignore``: every other one must be in ``frames``; None in a
    sidecar written before this was recorded, read as none) and ``files`` (every file nmperm wrote
    beside it, ``{"size", "sha256"}``: the record of ownership that ``--overwrite`` reads).
    """

    pattern: str
    scorer: str
    method: str
    fold: str
    architecture: str
    permutations: dict[str, list[int]] = field(default_factory=dict)
    frames: dict[str, str | None] = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    verification: dict = field(default_factory=dict)
    checksums: dict[str, dict] = field(default_factory=dict)
    masked: bool = True
    dense: list[str] | None = None
    files: dict[str, dict] = field(default_factory=dict)
    format: str = FORMAT

    @property
    def nm(self) -> NMPattern:
        return NMPattern.parse(self.pattern)

    def frame_of(self, linear: str) -> torch.Tensor | None:
        """The input permutation under which ``linear``'s stored weight is N:M (None: as stored)."""
        site = self.frames[linear]
        return None if site is None else torch.tensor(self.permutations[site], dtype=torch.long)

    def save(self, directory: str | Path) -> Path:
        """Write ``nmperm.json`` into ``directory``; returns its path."""
        path = Path(directory) / SIDECAR_NAME
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Sidecar:
        """Read ``directory/nmperm.json``; ``ValueError`` naming the file for anything malformed."""
        path = Path(directory) / SIDECAR_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: this directory was not written by nmperm (run `nmperm prune` first)"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(f"{path} is not UTF-8 text ({error.reason}): the sidecar is damaged") from None
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}): the sidecar "
                "is damaged; restore it or re-run nmperm prune"
            ) from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: object, source: str = SIDECAR_NAME) -> Sidecar:
        """A sidecar from its JSON object, with every field checked (``source`` names it in errors)."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a sidecar is a JSON object, found {type(data).__name__}")
        if data.get("format") not in FORMATS:
            raise ValueError(
                f"{source}: unknown sidecar format {data.get('format')!r}, expected one of {', '.join(FORMATS)}"
            )
        known = {f.name for f in fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise ValueError(
                f"{source}: unknown key(s) {', '.join(map(repr, extra))} in the sidecar "
                f"(known: {', '.join(sorted(known))}): it was edited or written by another tool; remove them or "
                "re-run nmperm prune"
            )
        missing = [k for k in ("pattern", "scorer", "method", "fold", "architecture") if k not in data]
        if missing:
            raise ValueError(f"{source}: the sidecar lacks {', '.join(missing)}: it is damaged; re-run nmperm prune")
        for key in ("pattern", "scorer", "method", "fold", "architecture"):
            if not isinstance(data[key], str):
                raise ValueError(f"{source}: {key} must be a string, found {data[key]!r}")
        if data["format"] == FORMAT and "checksums" not in data:
            raise ValueError(
                f"{source}: a {FORMAT} sidecar records the checksums of the pruned weights and this one has no "
                "checksums key: it was edited; restore it or re-run nmperm prune"
            )
        if not isinstance(data.get("masked", True), bool):
            raise ValueError(f"{source}: masked must be true or false, found {data['masked']!r}")
        dense = data.get("dense")
        if dense is not None and (not isinstance(dense, list) or not all(isinstance(n, str) for n in dense)):
            raise ValueError(f"{source}: dense must be a list of linear names, found {dense!r}")
        for key in ("permutations", "frames", "figures", "verification", "checksums", "files"):
            if not isinstance(data.get(key, {}), dict):
                raise ValueError(f"{source}: {key} must be a JSON object, found {type(data[key]).__name__}")
        for site, perm in data.get("permutations", {}).items():
            if not isinstance(perm, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in perm):
                raise ValueError(f"{source}: permutation {site!r} must be a list of integers")
        for linear, site in data.get("frames", {}).items():
            if site is not None and site not in data.get("permutations", {}):
                raise ValueError(f"{source}: frame of {linear!r} names site {site!r}, which has no permutation")
        for linear, entry in [*data.get("checksums", {}).items(), *data.get("files", {}).items()]:
            if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
                raise ValueError(f"{source}: checksum of {linear!r} must be an object with a sha256 string")
        try:
            NMPattern.parse(data["pattern"])
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
        return cls(**data)
