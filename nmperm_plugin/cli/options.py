"""Command-line flags built from the configuration schema (:mod:`nmperm_plugin.config`), the device
option and (``nmperm prune``) the parts of a vision-language model; used by ``nmperm prune`` and
``nmperm demo``."""

from __future__ import annotations

import argparse
import types
import typing

import torch

from ..config import PermuteConfig, field_types, markdown_table, schema
from ..learn.parts import DEFAULT_PARTS, parse_parts
from ..plugins.registry import names


def flag(name: str) -> str:
    """The command-line flag of schema field ``name``: ``block_size`` -> ``--block-size``."""
    return "--" + name.replace("_", "-")


def _scalar(annotation) -> type:
    """``int`` for ``int | None``, the element type for ``tuple[str, ...]``, else the type itself."""
    if isinstance(annotation, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is tuple:
        return typing.get_args(annotation)[0]
    return annotation


def add_config_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per schema field exposed on the command line (defaults: the schema's), except ``exclude``.

    Choices are the registered plugins' at parse time; booleans get ``--x`` / ``--no-x``.
    """
    types_ = field_types()
    group = parser.add_argument_group("permutation (the configuration schema, docs/configuration.md)")
    for spec in schema("cli"):
        if spec.name in exclude:
            continue
        annotation = types_[spec.name]
        kwargs: dict = {
            "dest": spec.name,
            "default": spec.default,
            "help": spec.metadata["help"] + " (default %(default)s)",
        }
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _scalar(annotation)
            if typing.get_origin(annotation) is tuple:
                kwargs |= {"nargs": "*", "metavar": spec.name.upper()}
            if spec.metadata["registry"] is not None:
                kwargs["choices"] = names(spec.metadata["registry"])
            elif spec.metadata["choices"] is not None:
                kwargs["choices"] = spec.metadata["choices"]
        group.add_argument(flag(spec.name), **kwargs)
    if "apply_mask" not in exclude:
        group.add_argument(
            "--permute-only",
            dest="apply_mask",
            action="store_false",
            help="learn and fold permutations, apply no mask (same as --no-apply-mask)",
        )


def config_from_args(args: argparse.Namespace, **overrides) -> PermuteConfig:
    """The :class:`PermuteConfig` of parsed flags (fields without a flag keep their defaults)."""
    given = {spec.name: getattr(args, spec.name) for spec in schema("cli") if hasattr(args, spec.name)}
    return PermuteConfig(**(given | overrides))


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="where the model and the learner run: cpu, cuda, cuda:1")


def resolve_device(name: str) -> torch.device:
    """``--device`` as a torch device, refused early (before anything is loaded) when unusable."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    return device


def _parts(value: str) -> tuple[str, ...]:
    try:
        return parse_parts(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).replace("parts ", "", 1)) from None


def add_parts_argument(parser: argparse.ArgumentParser) -> None:
    """``--parts text|vision|vision,text``, checked as the line is parsed (:func:`~.parse_parts`)."""
    parser.add_argument(
        "--parts",
        type=_parts,
        default=DEFAULT_PARTS,
        metavar="text|vision|vision,text",
        help="what to prune of a Qwen2.5-VL / Qwen2-VL model: text (the text decoder, as the paper; default), "
        "vision (the vision tower; needs an image dataset) or vision,text (both, the tower first); any other "
        "model is pruned whole, with the default",
    )


if __name__ == "__main__":  # python -m nmperm_plugin.cli.options > the table in docs/configuration.md
    print(markdown_table(names))
