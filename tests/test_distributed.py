"""Several ranks through torch.distributed (issue 15, item 3): 2 gloo ranks on CPU find the same
permutations as 1 rank with the same seed and data, the CLI runs under torchrun with rank 0 alone
writing, and a step with fewer sequences than ranks is refused on every rank. Unset, the sequences
per step become a multiple of the ranks (issue 33, item 5): torchrun works at the defaults."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_model
from loguru import logger

from nmperm_plugin import PermuteConfig, permute_
from nmperm_plugin.cli.commands import main
from nmperm_plugin.io.verify import verify_checkpoint
from nmperm_plugin.runtime import distributed
from nmperm_plugin.runtime.state import fingerprint

BIN = Path(sys.executable).parent
CASES = {
    "end_to_end": dict(objective="end_to_end", end_to_end_steps=4),
    "layerwise": dict(objective="layerwise", steps_per_layer=3),
}
COMMON = dict(block_size=16, sequences_per_step=2, select_sequences=2, select_every=1, fold="exact", seed=3)
CLI_FAST = ["--num-samples", "4", "--seq-len", "32", "--block-size", "16", "--end-to-end-steps", "3"]


def _ids() -> torch.Tensor:
    return torch.randint(0, 300, (6, 32), generator=torch.Generator().manual_seed(1))


def _permutations(case: str) -> dict[str, list[int]]:
    sidecar, _ = permute_(tiny_model(), _ids(), PermuteConfig(**COMMON, **CASES[case]))
    return sidecar.permutations


def _default_permutations() -> dict[str, list[int]]:
    """end_to_end with ``sequences_per_step`` unset (a multiple of the ranks under a process group)."""
    fields = {k: v for k, v in COMMON.items() if k != "sequences_per_step"} | CASES["end_to_end"]
    sidecar, _ = permute_(tiny_model(), _ids(), PermuteConfig(**fields))
    return sidecar.permutations


def _worker(rank: int, world: int, rendezvous: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        found = {case: _permutations(case) for case in CASES} | {"default": _default_permutations()}
        try:
            permute_(tiny_model(), _ids(), PermuteConfig(**(COMMON | CASES["end_to_end"] | {"sequences_per_step": 1})))
            found["refused"] = None
        except ValueError as error:
            found["refused"] = str(error)
        Path(results, f"rank{rank}.json").write_text(json.dumps(found))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """What each of 2 gloo ranks (spawned, 1 thread each) found for every case."""
    root = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, str(root / "rendezvous"), str(root)), nprocs=2, join=True)
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_gloo_ranks_find_the_permutations_of_one(two_ranks, case, one_thread):
    single = _permutations(case)
    assert two_ranks[0][case] == two_ranks[1][case]  # the ranks agree with each other
    assert two_ranks[0][case] == single  # and with one process on all the sequences
    assert any(perm != sorted(perm) for perm in single.values())  # something was permuted


def test_two_ranks_at_the_default_sequences_per_step_find_one_rank_with_the_same_global_batch(two_ranks, one_thread):
    single = _permutations("end_to_end")  # 1 process, sequences_per_step=2 given
    assert two_ranks[0]["default"] == two_ranks[1]["default"] == single


def test_unset_sequences_per_step_is_the_default_raised_to_a_multiple_of_the_ranks(monkeypatch):
    assert distributed.sequences_per_step(None) == 1 and distributed.sequences_per_step(3) == 3  # one process
    messages: list[str] = []
    handler = logger.add(messages.append, level="INFO", format="{message}")
    try:
        for ranks in (2, 3, 8):
            monkeypatch.setattr(distributed, "world_size", lambda ranks=ranks: ranks)
            assert distributed.sequences_per_step(None) == ranks
            assert distributed.sequences_per_step(ranks + 1) == ranks + 1  # given: kept, even when not a multiple
            assert distributed.sequences_per_step(None, log=False) == ranks
            with pytest.raises(ValueError, match=f"sequences_per_step 1 is smaller than the {ranks} ranks.*leave it"):
                distributed.sequences_per_step(1)
    finally:
        logger.remove(handler)
    assert len(messages) == 3 and "2 sequences per learning step" in messages[0] and "2 ranks" in messages[0]
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="1 sequence.* per step for 2 ranks.*--num-samples"):
        distributed.check_shares(1)  # fewer calibration sequences than ranks


def test_a_resumed_state_compares_the_resolved_sequences_per_step(monkeypatch):
    config = PermuteConfig()
    assert fingerprint(tiny_model(), _ids(), config)["config"]["sequences_per_step"] == 1
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    assert fingerprint(tiny_model(), _ids(), config)["config"]["sequences_per_step"] == 2


def test_fewer_sequences_per_step_than_ranks_is_refused_on_every_rank(two_ranks):
    messages = [found["refused"] for found in two_ranks]
    assert messages[0] is not None and messages[0] == messages[1]
    assert "sequences_per_step 1 is smaller than the 2 ranks" in messages[0]


def test_functions_are_the_identity_without_a_process_group():
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    index = torch.arange(5)
    assert torch.equal(distributed.share(index), index) and distributed.sum_float(2.5) == 2.5
    assert distributed.on_main(lambda: 7) == 7 and distributed.broadcast("x") == "x"
    distributed.check_shares(1)
    distributed.check_same("anything", "a")
    assert distributed.digest([torch.ones(2)]) != distributed.digest([torch.ones(3)])


def _torchrun(tmp_path: Path, logs: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--log-dir", str(tmp_path / logs)]
    command += ["--redirects", "3", "--no-python", str(BIN / "nmperm"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env | {"OMP_NUM_THREADS": "1"})


def _rank_logs(directory: Path) -> dict[int, str]:
    """Each rank's stdout and stderr, from torchrun's --log-dir."""
    found: dict[int, str] = {}
    for path in sorted(directory.rglob("*.log")):
        if path.parent.name.isdigit():
            found[int(path.parent.name)] = found.get(int(path.parent.name), "") + path.read_text()
    return found


def test_cli_under_torchrun_writes_one_verified_output(saved_model, tmp_path):
    model, text = saved_model
    out = tmp_path / "out"
    done = _torchrun(tmp_path, "logs", "prune", str(model), "--dataset", str(text), "--output", str(out), *CLI_FAST,
                     "--sequences-per-step", "2")  # fmt: skip
    logs = _rank_logs(tmp_path / "logs")
    assert done.returncode == 0, done.stderr[-3000:] + str(logs)
    assert sorted(logs) == [0, 1]
    assert "wrote" in logs[0] and "INFO" in logs[0]
    assert "wrote" not in logs[1] and "INFO" not in logs[1]  # rank 1 logs warnings and errors only
    assert verify_checkpoint(out).ok
    siblings = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out")))
    assert siblings == ["out"]  # no staging directory, no learning state left
    assert json.loads((out / "nmperm.json").read_text())["method"] == "learned/end_to_end"


def test_cli_under_torchrun_refuses_on_every_rank_and_none_hangs(saved_model, tmp_path):
    model, text = saved_model
    out = tmp_path / "out"
    done = _torchrun(tmp_path, "logs", "prune", str(model), "--dataset", str(text), "--output", str(out), *CLI_FAST,
                     "--sequences-per-step", "1")  # fmt: skip
    logs = _rank_logs(tmp_path / "logs")
    assert done.returncode != 0 and sorted(logs) == [0, 1]
    for rank in (0, 1):
        assert "sequences_per_step 1 is smaller than the 2 ranks" in logs[rank], logs[rank]
    assert not out.exists()


def test_cli_under_torchrun_at_the_defaults_takes_a_sequence_per_rank(saved_model, tmp_path, one_thread):
    """The documented launch without --sequences-per-step: 2 sequences per step, said in the log, and
    the permutations of 1 process given --sequences-per-step 2."""
    model, text = saved_model
    out, single = tmp_path / "out", tmp_path / "single"
    done = _torchrun(tmp_path, "logs", "prune", str(model), "--dataset", str(text), "--output", str(out), *CLI_FAST)
    logs = _rank_logs(tmp_path / "logs")
    assert done.returncode == 0, done.stderr[-3000:] + str(logs)
    assert "2 sequences per learning step" in logs[0] and "multiple of the 2 ranks" in logs[0], logs[0]
    assert main(["prune", str(model), "--dataset", str(text), "--output", str(single), *CLI_FAST,
                 "--sequences-per-step", "2"]) == 0  # fmt: skip
    permutations = [json.loads((d / "nmperm.json").read_text())["permutations"] for d in (out, single)]
    assert permutations[0] == permutations[1]
