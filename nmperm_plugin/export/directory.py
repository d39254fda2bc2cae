"""``nmperm export DIR``: a saved nmperm checkpoint loaded (checked against its sidecar's claim
first) and converted with :func:`~.torchao.to_torchao_`."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..io.sidecar import SIDECAR_NAME, Sidecar
from .report import ExportReport
from .torchao import TorchaoExportConfig, to_torchao_


def load_pruned_model(directory: Path, config: TorchaoExportConfig) -> nn.Module:
    """Load a transformers causal LM checkpoint in ``config``'s dtype (or as stored), in eval mode."""
    from transformers import AutoModelForCausalLM

    from ..io.models import load_pretrained

    model = load_pretrained(AutoModelForCausalLM, directory, dtype=config.torch_dtype or "auto")
    return model.eval()


def check_checkpoint_dir(directory: Path) -> None:
    """Raise ``FileNotFoundError`` unless ``directory`` holds a transformers config and an nmperm sidecar."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory: pass a checkpoint written by `nmperm prune`")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}/config.json not found: not a transformers checkpoint")
    if not (directory / SIDECAR_NAME).is_file():
        raise FileNotFoundError(
            f"{directory}/{SIDECAR_NAME} not found: this directory was not written by nmperm (run `nmperm prune` first)"
        )


def export_checkpoint(
    directory: str | Path, config: TorchaoExportConfig | None = None
) -> tuple[nn.Module, ExportReport]:
    """Load an nmperm checkpoint (model + ``nmperm.json``) and run :func:`to_torchao_` on it.

    ``fold: gather`` checkpoints get their gathers applied (``nmperm_plugin.learn.fold.apply_gather``) so the
    pruned weights are N:M before validation. Raises ``FileNotFoundError``/``ValueError`` for a
    directory that is not an nmperm checkpoint, before anything is loaded.
    """
    config = config or TorchaoExportConfig()
    path = Path(directory)
    check_checkpoint_dir(path)
    sidecar = Sidecar.load(path)
    model = load_pruned_model(path, config)
    from ..io.verify import claim_failures

    problems = claim_failures(model, sidecar) if sidecar.masked else ["it holds permutations only, no N:M mask"]
    if problems:
        raise ValueError(
            f"{path} is not the N:M checkpoint its {SIDECAR_NAME} says: {'; '.join(problems)}; nothing to export as "
            "2:4 (`nmperm verify` shows every check)"
        )
    return model, to_torchao_(model, config, sidecar)
