"""The sidecar file written beside every checkpoint: permutations, pattern and measured figures."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .nm import NMPattern

SIDECAR_NAME = "nmperm.json"
FORMAT = "nmperm-sidecar/1"


@dataclass
class Sidecar:
    """What a checkpoint's N:M structure is and how to recover it.

    ``frames`` maps every pruned linear to the permutation site whose permutation makes its stored
    weight N:M (``W[:, permutations[site]]``), or to ``None`` when the stored weight itself is N:M
    (``fold: exact``: permutations are folded into the weights). In ``fold: gather`` checkpoints the
    weights stay in the original channel order, so stock loaders compute the right function, and
    serving code re-applies the gathers (see :func:`nmperm_plugin.fold.apply_gather`).
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
    format: str = FORMAT

    @property
    def nm(self) -> NMPattern:
        return NMPattern.parse(self.pattern)

    def frame_of(self, linear: str) -> torch.Tensor | None:
        """The input permutation under which ``linear``'s stored weight is N:M (None: as stored)."""
        site = self.frames[linear]
        return None if site is None else torch.tensor(self.permutations[site], dtype=torch.long)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SIDECAR_NAME
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Sidecar:
        path = Path(directory) / SIDECAR_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: this directory was not written by nmperm (run `nmperm prune` first)"
            )
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown sidecar format {data.get('format')!r}, expected {FORMAT!r}")
        return cls(**data)
