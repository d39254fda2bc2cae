"""What an export did to every linear layer: converted, ready (validated and packed on CPU) or left dense."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

CONVERTED = "converted"  # weight replaced by a torchao sparse tensor subclass (CUDA)
READY = "ready"  # meets every requirement, packed and round-tripped; converts on a supported CUDA GPU
DENSE = "dense"  # left dense; ``reason`` says why

STATUSES = (CONVERTED, READY, DENSE)


@dataclass
class LayerResult:
    """The outcome for one linear layer.

    ``pruned`` is True when the sidecar lists the layer as pruned, False when it does not, and None when
    no sidecar was given. ``nm_ok`` says whether the stored weight is N:M under the declared pattern
    (None: not checked, because the layer is not declared pruned). ``roundtrip`` is the result of the
    2:4 pack/unpack check (None: not run).
    """

    name: str
    out_features: int
    in_features: int
    dtype: str
    status: str
    reason: str = ""
    pruned: bool | None = None
    nm_ok: bool | None = None
    roundtrip: bool | None = None

    @property
    def problem(self) -> str | None:
        """Why this layer fails ``--check`` (a layer declared pruned that is not N:M, an inexact round trip)."""
        if self.pruned and self.nm_ok is False:
            return "listed as pruned in the sidecar but its weight is not N:M"
        if self.roundtrip is False:
            return "2:4 pack/unpack round trip is not exact"
        return None


@dataclass
class ExportReport:
    """Per-layer results of an export plus run-wide notes (device, backend, what still needs a GPU)."""

    target: str
    backend: str
    precision: str
    device: str
    layers: list[LayerResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gathers: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of layers per status."""
        return {status: sum(layer.status == status for layer in self.layers) for status in STATUSES}

    @property
    def problems(self) -> list[LayerResult]:
        """Layers that fail ``--check``."""
        return [layer for layer in self.layers if layer.problem is not None]

    @property
    def ok(self) -> bool:
        """True when no layer fails ``--check`` and every layer the sidecar lists exists in the model."""
        return not self.problems and not self.missing

    def layer(self, name: str) -> LayerResult:
        """The result for layer ``name`` (KeyError naming the layer otherwise)."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no linear layer named {name!r} in this export report")

    def summary(self) -> str:
        """One line: what was exported how, and how many layers ended in each status."""
        counts = self.counts()
        return (
            f"{self.target} export ({self.precision}, {self.backend}) on {self.device}: "
            f"{counts[CONVERTED]} converted, {counts[READY]} ready, {counts[DENSE]} left dense"
        )

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of the whole report."""
        return {
            "target": self.target,
            "backend": self.backend,
            "precision": self.precision,
            "device": self.device,
            "counts": self.counts(),
            "ok": self.ok,
            "problems": [{"name": layer.name, "problem": layer.problem} for layer in self.problems],
            "missing": list(self.missing),
            "notes": list(self.notes),
            "gathers": list(self.gathers),
            "layers": [asdict(layer) for layer in self.layers],
        }

    def to_text(self) -> str:
        """A plain-text table, one row per linear layer, followed by a summary and the notes."""
        header = ("layer", "out x in", "dtype", "status", "round trip", "reason")
        rows = [header] + [_row(layer) for layer in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        lines = [
            "  ".join([cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)] + [row[-1]])
            for row in rows
        ]
        lines.insert(1, "-" * min(120, max(len(line) for line in lines)))
        lines += ["", self.summary()]
        lines += [f"problem: {layer.name}: {layer.problem}" for layer in self.problems]
        lines += [f"problem: {name}: listed in the sidecar, not a linear of the model" for name in self.missing]
        if self.gathers:
            lines.append(f"gathers kept as index gathers: {len(self.gathers)}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(line.rstrip() for line in lines)


def _row(layer: LayerResult) -> tuple[str, ...]:
    roundtrip = {None: "-", True: "exact", False: "NOT EXACT"}[layer.roundtrip]
    shape = f"{layer.out_features} x {layer.in_features}"
    return (layer.name, shape, layer.dtype, layer.status, roundtrip, layer.reason)
