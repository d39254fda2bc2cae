"""Learning across ``torch.distributed`` ranks (``torchrun``): every rank holds the whole model and
the same calibration data, takes its share of each step's sequences, and the cost matrices'
gradients (tiny) are summed over the ranks, so all ranks keep identical permuters.

Without an initialised process group every function is the single-process identity.

Launch (``docs/distributed.md``): ``torchrun --nproc-per-node N --no-python nmperm prune ...``
(:func:`init_from_env` / :func:`shutdown` in the CLI), or a user's own script that initialises the
process group and calls ``permute_`` on every rank with the same model, data and configuration.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
import torch.distributed as dist
from loguru import logger

from ..config import SEQUENCES_PER_STEP

T = TypeVar("T")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes outputs and logs (rank 0, or no process group)."""
    return rank() == 0


def sequences_per_step(configured: int | None, log: bool = True) -> int:
    """The calibration sequences of one learning step: ``configured`` when the user set it (refused
    below the number of ranks), else the default raised to the smallest multiple of the ranks at or
    above it, so that ``torchrun`` works at the defaults (said in the log when ``log``)."""
    ranks = world_size()
    if configured is not None:
        if configured < ranks:
            raise ValueError(
                f"sequences_per_step {configured} is smaller than the {ranks} ranks: every rank needs a sequence of "
                f"each step; set sequences_per_step (--sequences-per-step) to at least {ranks} (a multiple of it "
                "splits evenly), or leave it unset for a multiple of the ranks"
            )
        return configured
    resolved = -(-SEQUENCES_PER_STEP // ranks) * ranks
    if log and resolved != SEQUENCES_PER_STEP:
        logger.info(
            f"nmperm: {resolved} sequences per learning step: sequences_per_step is unset and its default "
            f"{SEQUENCES_PER_STEP} is raised to a multiple of the {ranks} ranks, so each rank takes an equal share "
            "(set --sequences-per-step to choose)"
        )
    return resolved


def check_shares(per_step: int) -> None:
    """Each rank needs at least one sequence of every step (``per_step``: the step's sequences, at
    most the calibration sequences)."""
    if per_step < world_size():
        raise ValueError(
            f"{per_step} sequence(s) per step for {world_size()} ranks: every rank needs a sequence of each step; "
            f"give at least {world_size()} calibration sequences (--num-samples) and sequences_per_step"
        )


def share(index: torch.Tensor) -> torch.Tensor:
    """This rank's part of a step's sequence ``index`` (all of it on one rank)."""
    return index[rank() :: world_size()]


def sum_gradients(parameters) -> None:
    """Sum the gradients of ``parameters`` over the ranks (each rank's loss is pre-scaled by its share)."""
    if world_size() == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def sum_float(value: float) -> float:
    """``value`` summed over the ranks."""
    if world_size() == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(total)
    return float(total)


def launched_world_size() -> int:
    """The ``WORLD_SIZE`` a launcher (``torchrun``) set in the environment (1 when none did)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} in the environment is not a number") from None


def init_from_env(device: str) -> torch.device:
    """Join the process group a launcher described in the environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): gloo for a CPU ``device``, NCCL for CUDA, where
    each rank takes ``cuda:LOCAL_RANK``. Returns the device this rank runs on."""
    wanted = torch.device(device)
    if wanted.type == "cuda":
        if wanted.index is not None:
            raise ValueError(
                f"--device {device} under a launcher with {launched_world_size()} ranks: give --device cuda, "
                "each rank then uses cuda:LOCAL_RANK (restrict the GPUs with CUDA_VISIBLE_DEVICES)"
            )
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
        wanted = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(wanted)
    elif wanted.type != "cpu":
        raise ValueError(f"--device {device}: several ranks run on cpu (gloo) or cuda (NCCL) only")
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if wanted.type == "cuda" else "gloo", device_id=wanted if wanted.type == "cuda" else None
        )
    return wanted


def shutdown(barrier: bool) -> None:
    """Leave the process group: after a barrier (``barrier``: every rank got this far without an
    error, so none exits while another still works), then destroy it."""
    if not dist.is_initialized():
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()


def _device() -> torch.device:
    """Where collective tensors live: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast(value: T) -> T:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if world_size() == 1:
        return value
    holder = [value if is_main() else None]
    dist.broadcast_object_list(holder, src=0, device=_device())
    return holder[0]


def on_main(work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 only and give every rank its result, or raise its exception on every
    rank (a refusal or a failed write on rank 0 ends all ranks the same way; none waits forever)."""
    if world_size() == 1:
        return work()
    outcome: tuple[bool, object] = (True, None)
    if is_main():
        try:
            outcome = (True, work())
        except BaseException as error:  # noqa: BLE001 - re-raised below, on every rank
            outcome = (False, error)
    try:
        outcome = broadcast(outcome)
    except Exception:  # noqa: BLE001 - an exception that does not pickle: its message instead
        if not is_main() or outcome[0]:
            raise
        outcome = broadcast((False, RuntimeError(f"rank 0: {type(outcome[1]).__name__}: {outcome[1]}")))
    ok, value = outcome
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


def digest(tensors: Iterable[torch.Tensor]) -> str:
    """A sha256 of the tensors' shapes, dtypes and bytes (in order)."""
    hasher = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        hasher.update(f"{tuple(tensor.shape)}{tensor.dtype};".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def check_same(what: str, value: str) -> None:
    """Refuse (on every rank) when ranks hold different ``value`` (e.g. a :func:`digest`) for
    ``what``: the ranks must start from the same model, data, seed and configuration."""
    if world_size() == 1:
        return
    values: list = [None] * world_size()
    dist.all_gather_object(values, value)
    differing = [r for r, v in enumerate(values) if v != values[0]]
    if differing:
        raise ValueError(
            f"{what} differs between ranks (rank 0 and rank {differing[0]}): every rank must load the same model "
            "and calibration data with the same configuration and seed"
        )
