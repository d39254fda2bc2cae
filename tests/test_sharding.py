"""Layer-sharded learning (issue 33, item 3): 2 gloo ranks with ``shard_weights`` find the
permutations and masks of 1 process with the same global batch while each keeps about half of the
decoder layers' weights and scores; ``nmperm prune --shard-weights`` under torchrun writes a
verified checkpoint; what cannot run is refused before any work."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_model
from test_distributed import CLI_FAST, _rank_logs, _torchrun

from nmperm_plugin import PermuteConfig, permute_
from nmperm_plugin.io.verify import verify_checkpoint
from nmperm_plugin.learn import sequential, window
from nmperm_plugin.runtime import sharding

CASES = {
    "end_to_end": dict(objective="end_to_end", end_to_end_steps=4),
    "window": dict(objective="window", window_layers=1, end_to_end_steps=3, dense_targets="recompute"),
    "layerwise": dict(objective="layerwise", steps_per_layer=3),
}
COMMON = dict(block_size=16, sequences_per_step=2, select_sequences=2, select_every=1, fold="exact", seed=3)


def _ids() -> torch.Tensor:
    return torch.randint(0, 300, (6, 32), generator=torch.Generator().manual_seed(1))


def _run(case: str, shard: bool, measured: list | None = None) -> tuple[dict, dict]:
    """The sidecar's permutations and the pruned, folded model's state of one run of ``case``;
    ``measured`` collects what this rank holds as each learning phase starts."""
    model = tiny_model()
    real = window.learn, sequential.learn
    if measured is not None:
        _measure_learning(model, measured)
    try:
        sidecar, _ = permute_(model, _ids(), PermuteConfig(**COMMON, **CASES[case], shard_weights=shard))
    finally:
        window.learn, sequential.learn = real
    return sidecar.permutations, model.state_dict()


def _measure_learning(model, measured: list) -> None:
    """Record, as each learning phase starts, the bytes this rank keeps of the decoder layers'
    parameters and of the learned linears' scores (``learn`` patched in the objectives' modules)."""
    parameters = [p for layer in model.model.layers for p in layer.parameters()]

    def wrap(real):
        def learn(effective, *args, **kwargs):
            measured.append(
                {
                    "weights": sharding.storage_bytes(parameters),
                    "scores": sharding.storage_bytes(m.scores for m in effective.members),
                    "members": [m.param for m in effective.members],
                }
            )
            return real(effective, *args, **kwargs)

        return learn

    for module in (window, sequential):
        module.learn = wrap(module.learn)


def _worker(rank: int, world: int, rendezvous: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        found: dict = {"measured": {}}
        for case in CASES:
            measured: list = []
            perms, state = _run(case, True, measured)
            found[case] = perms
            found["measured"][case] = measured
            torch.save(state, Path(results, f"{case}-rank{rank}.pt"))
        try:  # 5 selection sequences in batches of 2: rank 0 ranks on 2 batches, rank 1 on 1
            unequal = COMMON | CASES["end_to_end"] | {"select_sequences": 5, "shard_weights": True}
            permute_(tiny_model(), _ids(), PermuteConfig(**unequal))
            found["refused"] = None
        except ValueError as error:
            found["refused"] = str(error)
        Path(results, f"rank{rank}.json").write_text(json.dumps(found))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_sharded_ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    """What each of 2 gloo ranks (spawned, 1 thread each) found with shard_weights, and where their
    models' final states are."""
    root = tmp_path_factory.mktemp("sharded")
    mp.spawn(_worker, args=(2, str(root / "rendezvous"), str(root)), nprocs=2, join=True)
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)], root


@pytest.mark.parametrize("case", list(CASES))
def test_two_sharded_ranks_find_the_permutations_and_masks_of_one(two_sharded_ranks, case, one_thread):
    found, root = two_sharded_ranks
    perms, state = _run(case, False)  # 1 process, unsharded, the same global batch of 2 sequences
    assert found[0][case] == found[1][case] == perms
    assert any(perm != sorted(perm) for perm in perms.values())  # something was permuted
    for rank in (0, 1):  # the model is whole again on every rank: the same masked, folded weights
        sharded_state = torch.load(root / f"{case}-rank{rank}.pt")
        assert sharded_state.keys() == state.keys()
        different = [k for k in state if not torch.equal(sharded_state[k], state[k])]
        assert not different, different
    masks = {k: state[k] == 0 for k in state if k.endswith("proj.weight")}
    assert masks and all(m.float().mean() >= 0.5 for m in masks.values())  # 2:4 masks were applied


def test_each_sharded_rank_holds_half_of_the_layer_weights_and_scores(two_sharded_ranks):
    found, _ = two_sharded_ranks
    layers = tiny_model().model.layers
    whole_weights = sum(p.numel() * p.element_size() for p in layers.parameters())
    matrices = sum(p.numel() * p.element_size() for p in layers.parameters() if p.dim() >= 2)
    vectors = whole_weights - matrices  # norms: tiny, kept whole
    named = {f"{name}": p for name, p in layers.named_parameters()}
    for rank in (0, 1):
        for case, measured in found[rank]["measured"].items():
            assert measured, case
            for phase in measured:
                assert phase["weights"] == matrices // 2 + vectors, (case, phase["weights"], whole_weights)
                assert phase["weights"] < 0.52 * whole_weights
                # the scores (float32) of the phase's linears: half of each, padded to whole elements
                wanted = 0
                for param in phase["members"]:
                    suffix = param.split("layers.")[-1]
                    matching = [p for name, p in named.items() if name.endswith(suffix)]
                    wanted += math.ceil(matching[0].numel() / 2) * 4
                assert phase["scores"] == wanted, (case, phase)


def test_unequal_selection_batches_are_refused_on_every_rank(two_sharded_ranks):
    found, _ = two_sharded_ranks
    messages = [ranks["refused"] for ranks in found]
    assert messages[0] is not None and messages[0] == messages[1]
    assert "select_sequences (--select-sequences) to a multiple of 2" in messages[0]


def test_shard_weights_without_a_process_group_is_refused_before_any_work():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"shard_weights \(--shard-weights\).*none is initialised.*torchrun"):
        permute_(model, _ids(), PermuteConfig(**COMMON, **CASES["end_to_end"], shard_weights=True))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shards_gather_back_whole_in_one_process_group_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        weight = torch.randn(5, 3)
        shard = sharding.shard_of(weight)
        assert sharding.is_shard(shard) and not sharding.is_shard(weight)
        assert torch.equal(sharding.whole(shard), weight)
        mask = weight > 0
        assert torch.equal(sharding.part_of(mask, shard), mask.reshape(-1))
        assert sharding.part_of(mask, weight) is mask
    finally:
        dist.destroy_process_group()


def test_cli_under_torchrun_with_shard_weights_writes_one_verified_output(saved_model, tmp_path):
    model, text = saved_model
    out = tmp_path / "out"
    done = _torchrun(tmp_path, "logs", "prune", str(model), "--dataset", str(text), "--output", str(out), *CLI_FAST,
                     "--shard-weights")  # fmt: skip
    logs = _rank_logs(tmp_path / "logs")
    assert done.returncode == 0, done.stderr[-3000:] + str(logs)
    assert "sharded over the ranks" in logs[0], logs[0]
    assert verify_checkpoint(out).ok
    assert json.loads((out / "nmperm.json").read_text())["method"] == "learned/end_to_end"
