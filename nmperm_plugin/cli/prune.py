"""``nmperm prune``: load the model and its calibration data, check the output before any work, run
:func:`~nmperm_plugin.permute_`, evaluate, write a verified checkpoint (or, with ``--recipe``, run an
llm-compressor recipe through ``oneshot``)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from loguru import logger
from torch import nn

from ..api import permute_
from ..core.nm import NMPattern
from ..data.images import image_batches, is_image_dataset, load_images, load_vision_model, top1_accuracy
from ..data.text import load_texts, token_windows
from ..data.vl import load_captioned_images, load_vl_model, vl_batches
from ..eval.perplexity import perplexity
from ..io.checkpoint import check_output_dir, save_checkpoint
from ..io.models import check_seq_len, load_model, model_type_of, stored_dtype
from ..io.replace import check_free_space
from ..io.safety import guard_output
from ..learn import parts
from ..runtime import distributed, resume, sharding
from .options import add_config_arguments, add_device_argument, config_from_args, resolve_device


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
        per_step = distributed.sequences_per_step(config.sequences_per_step, log=False)  # logged as the run starts
        distributed.check_shares(min(per_step, args.num_samples))
    target = distributed.on_main(lambda: check_output_dir(args.output, args.overwrite, inputs))
    state_dir = resume.state_dir_of(target)
    learning = config.method == "learned"  # only the learning keeps a resumable state
    if learning:
        args.state_dir = state_dir
        distributed.on_main(lambda: guard_output(state_dir, inputs))
        distributed.on_main(lambda: resume.check_state_dir(state_dir))  # a folder of yours there: before the load
    if config.shard_weights:  # no process group, or ranks with unequal selection batches: refused before the load
        per_step = distributed.sequences_per_step(config.sequences_per_step, log=False)
        sharding.check_setting(config.select_sequences, per_step, args.num_samples)
    device = resolve_device(args.device)
    model, tokenizer, calibration, evaluate = load(args)
    written_dtype = stored_dtype(model)
    distributed.on_main(lambda: check_free_space(target, checkpoint_bytes(model, written_dtype)))
    store = None
    if learning:
        store = parts.open_state(
            state_dir, model, calibration, config, args.parts, device, args.resume, restart_hint="add --no-resume"
        )
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
    if config.apply_mask:
        what += f"; weights {'reconstructed' if config.reconstruct else 'kept as they were'}"
        what += f", {config.distill_steps} distillation steps" if config.distill_steps else ""
        if not (config.reconstruct and config.distill_steps):
            logger.info(f"nmperm: for the best quality add {BEST_QUALITY} (docs/results.md)")
    if distributed.is_main():
        print(f"wrote {target} ({what}; verified: {len(sidecar.frames)} pruned linears, checksums recorded)")
    return 0


BEST_QUALITY = "--reconstruct --end-to-end-steps 48 --distill-steps 80"  # recipes/sparsegpt-2of4-learned.yaml


def checkpoint_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """About how many bytes ``model``'s weights take written (in ``dtype``, else as they are)."""
    size = 0 if dtype is None else torch.tensor([], dtype=dtype).element_size()
    return sum(p.numel() * (size or p.element_size()) for p in model.parameters())
