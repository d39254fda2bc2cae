"""``nmperm export DIR --to torchao [--dtype bf16|fp16|fp8] [--backend cusparselt|cutlass] [--check] [--json]
[--serve [--serve-shapes 1x2048 ...] [--serve-mode cuda_graph|compile] [--tune time|search|off]]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import compat
from .cusparselt import TUNE_METHODS
from .serving import SERVE_MODES
from .validate import BACKENDS, PRECISIONS

TARGETS = ("torchao",)
EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2
SERVE_TOLERANCE = 1e-2  # relative L2 error of served (graph replay) logits against the eager forward


def add_export_parser(subparsers: compat.SubParsers) -> argparse.ArgumentParser:
    """Add the ``export`` sub-command to an ``argparse`` sub-parser set; returns the new parser."""
    parser = subparsers.add_parser(
        "export",
        help="convert a pruned checkpoint's 2:4 layers for serving (torchao sparse kernels)",
        description=(
            "Validate every linear layer of an nmperm checkpoint against the torchao 2:4 backend "
            "(pattern, dtype, shape minimums), pack each valid weight into the compressed 2:4 form and "
            "check the round trip; on a CUDA GPU, convert them. Writes nothing; prints a per-layer report."
        ),
    )
    parser.add_argument("directory", type=Path, help="checkpoint directory written by `nmperm prune` (nmperm.json)")
    parser.add_argument("--to", dest="target", choices=TARGETS, default="torchao", help="serving target")
    parser.add_argument(
        "--dtype",
        choices=PRECISIONS,
        default=None,
        help="cast to bf16/fp16 before converting, or fp8 for FP8 2:4 (SM 9.x); default: keep the stored dtype",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="2:4 kernel library for bf16/fp16 (default cusparselt); fp8 always uses cutlass",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when a layer listed as pruned is not N:M or a 2:4 round trip is not exact",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument(
        "--serve",
        action="store_true",
        help="then prepare the converted model for serving (cuSPARSELt algorithm per shape, CUDA graphs; CUDA only) "
        "and compare served logits and latency with the eager forward",
    )
    parser.add_argument(
        "--serve-shapes", nargs="+", default=["1x2048"], metavar="BxT", help="input shapes to capture (default 1x2048)"
    )
    parser.add_argument("--serve-mode", choices=SERVE_MODES, default="cuda_graph", help="capture mechanism")
    parser.add_argument("--tune", choices=TUNE_METHODS, default="time", help="cuSPARSELt algorithm choice per shape")
    parser.set_defaults(func=run_export)
    return parser


def _error(message: str) -> int:
    print(f"nmperm export: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def serve_config(args: argparse.Namespace):
    """``--serve``'s ``ServeConfig`` (None without it); ``ValueError``/``ServeError`` for bad options or no CUDA."""
    if not getattr(args, "serve", False):
        return None
    from .cusparselt import require_cuda
    from .serving import ServeConfig

    config = ServeConfig(shapes=tuple(args.serve_shapes), mode=args.serve_mode, tune=args.tune)
    require_cuda("nmperm export --serve")
    return config


def serve_text(rows: list[dict]) -> str:
    """The ``--serve`` comparison as a table: shape, error against eager, eager and served latency."""
    lines = ["", "served (graph replay) vs eager forward:", "shape        rel_err    eager ms   served ms  speedup"]
    for row in rows:
        lines.append(
            f"{row['shape']:<12} {row['rel_err']:<10.2e} {row['eager_ms']:<10.3f} {row['served_ms']:<10.3f} "
            f"x{row['speedup']:.2f}"
        )
    return "\n".join(lines)


def run_export(args: argparse.Namespace) -> int:
    """Run ``nmperm export``; 0 on success, 1 when ``--check`` finds a problem, 2 on bad input."""
    from .cusparselt import ServeError
    from .directory import check_checkpoint_dir, export_checkpoint
    from .torchao import TorchaoExportConfig

    try:
        config = TorchaoExportConfig(dtype=args.dtype, backend=args.backend, check=True)
        serving = serve_config(args)
        check_checkpoint_dir(Path(args.directory))
        model, report = export_checkpoint(args.directory, config)
    except (OSError, ValueError, ServeError) as error:
        return _error(str(error))
    served_rows = None
    if serving is not None:
        from .serving import check_served, serve

        try:
            served_rows = check_served(serve(model, serving))
        except ServeError as error:
            return _error(str(error))
    if args.json:
        data = report.to_dict() | ({"serve": served_rows} if served_rows is not None else {})
        print(json.dumps(data, indent=1))
    else:
        print(report.to_text() + (serve_text(served_rows) if served_rows is not None else ""))
    failures = len(report.problems) + len(report.missing)
    failures += sum(row["rel_err"] > SERVE_TOLERANCE for row in served_rows or [])
    if args.check and failures:
        print(f"nmperm export: check failed: {failures} problem(s)", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return EXIT_OK
