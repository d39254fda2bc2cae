"""``nmperm export DIR --to torchao [--dtype bf16|fp16|fp8] [--backend cusparselt|cutlass] [--check] [--json]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .validate import BACKENDS, PRECISIONS

TARGETS = ("torchao",)
EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
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
    parser.set_defaults(func=run_export)
    return parser


def _error(message: str) -> int:
    print(f"nmperm export: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def run_export(args: argparse.Namespace) -> int:
    """Run ``nmperm export``; 0 on success, 1 when ``--check`` finds a problem, 2 on bad input."""
    from .torchao import TorchaoExportConfig, check_checkpoint_dir, export_checkpoint

    try:
        config = TorchaoExportConfig(dtype=args.dtype, backend=args.backend, check=True)
        check_checkpoint_dir(Path(args.directory))
        _, report = export_checkpoint(args.directory, config)
    except (OSError, ValueError) as error:
        return _error(str(error))
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.to_text())
    if args.check and not report.ok:
        print(f"nmperm export: check failed: {len(report.problems) + len(report.missing)} problem(s)", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return EXIT_OK
