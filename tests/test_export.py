"""Tests of the torchao serving export: validation reasons, 2:4 packing, checkpoint export, CLI, GPU paths."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

from nmperm_plugin.core.nm import NMPattern, is_nm, nm_mask
from nmperm_plugin.export import (
    CONVERTED,
    DENSE,
    READY,
    TorchaoExportConfig,
    export_checkpoint,
    pack_2to4,
    roundtrip_exact,
    shape_rule,
    to_torchao_,
    unpack_2to4,
    validate_linear,
)
from nmperm_plugin.export.cli import add_export_parser, run_export
from nmperm_plugin.io.sidecar import SIDECAR_NAME, Sidecar

TWO_FOUR = NMPattern(2, 4)
PRUNED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
PRUNED += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (sparse 2:4 kernels)")
CPU = TorchaoExportConfig(dtype="bf16", device="cpu")


def pruned_2to4(out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A random weight with a magnitude 2:4 mask applied."""
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    return (weight * nm_mask(weight.abs(), TWO_FOUR)).to(dtype)


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(config).eval()


def pruned_names(layers: int = 2) -> list[str]:
    return [f"model.layers.{i}.{suffix}" for i in range(layers) for suffix in PRUNED]


@torch.no_grad()
def prune_model_(model: nn.Module, names: list[str]) -> None:
    modules = dict(model.named_modules())
    for name in names:
        weight = modules[name].weight
        weight.mul_(nm_mask(weight.abs(), TWO_FOUR))


def write_checkpoint(directory, model: nn.Module, fold: str = "exact", frames=None, permutations=None) -> None:
    model.save_pretrained(directory)
    frames = frames if frames is not None else {name: None for name in pruned_names()}
    Sidecar(
        pattern="2:4",
        scorer="magnitude",
        method="identity",
        fold=fold,
        architecture="llama",
        permutations=permutations or {},
        frames=frames,
    ).save(directory)


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_llama()
    prune_model_(model, pruned_names())
    write_checkpoint(tmp_path, model)
    return tmp_path


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nmperm")
    add_export_parser(parser.add_subparsers(dest="command"))
    return run_export(parser.parse_args(argv))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- validation -------------------------------------------------------------------------------------------


def test_shape_rules_are_torchs_semi_structured_constraints():
    for backend, cls in (
        ("cusparselt", torch.sparse.SparseSemiStructuredTensorCUSPARSELT),
        ("cutlass", torch.sparse.SparseSemiStructuredTensorCUTLASS),
    ):
        for dtype in (torch.float16, torch.bfloat16):
            rule = shape_rule(backend, "bf16", dtype)
            expected = cls._DTYPE_SHAPE_CONSTRAINTS[dtype]
            assert (rule.min_rows, rule.min_cols) == (expected.sparse_min_rows, expected.sparse_min_cols)
    assert (shape_rule("cutlass", "bf16", torch.bfloat16).min_cols) == 64
    fp8 = shape_rule("cutlass", "fp8", torch.bfloat16)
    assert (fp8.min_rows, fp8.min_cols) == (16, 32)


def test_valid_2to4_layer_is_ready():
    result = validate_linear(
        "w", pruned_2to4(64, 64), backend="cusparselt", precision="bf16", declared=TWO_FOUR, pruned=True
    )
    assert result.status == READY and result.reason == "" and result.nm_ok is True and result.problem is None


def test_pattern_4_8_is_rejected():
    weight = torch.ones(32, 64, dtype=torch.bfloat16)
    weight.view(32, 8, 8)[..., 4:] = 0  # 4:8 (first four of every eight kept), so groups of 4 are 4/4 and 0/4
    assert is_nm(weight, NMPattern(4, 8)) and not is_nm(weight, TWO_FOUR)
    result = validate_linear("w", weight, backend="cusparselt", precision="bf16", declared=NMPattern(4, 8), pruned=True)
    assert result.status == DENSE
    assert result.reason == "pattern is 4:8, backend needs exactly 2:4"
    assert result.nm_ok is True and result.problem is None  # honest 4:8 layer: not a --check failure


@pytest.mark.parametrize(
    "backend, shape, expected",
    [
        ("cutlass", (32, 40), "in_features 40 not a multiple of 64 required by CUTLASS"),
        ("cutlass", (48, 64), "out_features 48 not a multiple of 32 required by CUTLASS"),
        ("cusparselt", (24, 64), "out_features 24 not a multiple of 16 required by cuSPARSELt"),
        ("cusparselt", (16, 8), "in_features 8 not a multiple of 16 required by cuSPARSELt"),
    ],
)
def test_shape_below_backend_minimum_is_rejected(backend, shape, expected):
    result = validate_linear("w", pruned_2to4(*shape), backend=backend, precision="bf16", pruned=True)
    assert result.status == DENSE
    assert result.reason == expected


def test_fp8_shape_rule_rejects_in_features_not_multiple_of_32():
    result = validate_linear("w", pruned_2to4(32, 48), backend="cutlass", precision="fp8")
    assert result.status == DENSE
    assert result.reason == "in_features 48 not a multiple of 32 required by FP8 2:4 CUTLASS"
    assert validate_linear("w", pruned_2to4(32, 48), backend="cusparselt", precision="bf16").status == READY


def test_float32_is_rejected_with_the_flag_to_use():
    result = validate_linear("w", pruned_2to4(64, 64, torch.float32), backend="cusparselt", precision="")
    assert result.status == DENSE
    assert result.reason == "dtype float32: convert with --dtype bf16"


def test_layer_not_listed_in_sidecar_stays_dense_without_problem():
    result = validate_linear(
        "lm_head", torch.randn(64, 64).bfloat16(), backend="cusparselt", precision="bf16", pruned=False
    )
    assert result.status == DENSE and result.reason == "not pruned (not listed in the sidecar)"
    assert result.nm_ok is None and result.problem is None


def test_layer_listed_as_pruned_but_dense_is_a_problem():
    weight = torch.randn(64, 64).bfloat16()
    result = validate_linear("w", weight, backend="cusparselt", precision="bf16", declared=TWO_FOUR, pruned=True)
    assert result.status == DENSE and result.reason.startswith("not 2:4 as stored: ")
    assert result.nm_ok is False
    assert result.problem == "listed as pruned in the sidecar but its weight is not N:M"


def test_several_reasons_are_all_listed():
    weight = torch.randn(24, 40)
    result = validate_linear("w", weight, backend="cutlass", precision="", declared=TWO_FOUR, pruned=True)
    for part in ("not 2:4 as stored", "dtype float32", "out_features 24", "in_features 40"):
        assert part in result.reason


# --- packing ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pack_unpack_roundtrip_is_exact(dtype):
    weight = pruned_2to4(64, 128, dtype)
    values, meta = pack_2to4(weight)
    assert values.shape == (64, 64) and values.dtype == dtype
    assert meta.dtype == torch.int16 and meta.shape == (64, 8)
    assert torch.equal(values, weight[weight != 0].view(64, 64))  # exactly the kept values, in order
    assert torch.equal(unpack_2to4(values, meta, (64, 128)), weight)
    assert roundtrip_exact(weight)


def test_roundtrip_pads_tiles_smaller_than_the_python_packer_needs():
    weight = pruned_2to4(16, 48, torch.float16)  # cuSPARSELt-valid, below the packer's 32 x 32 tile
    values, meta = pack_2to4(weight)
    assert values.shape == (32, 32)  # padded to 32 x 64
    assert torch.equal(unpack_2to4(values, meta, (16, 48)), weight)


def test_roundtrip_detects_a_group_with_three_nonzeros():
    weight = pruned_2to4(64, 64)
    weight[3, 4:8] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    assert not roundtrip_exact(weight)


def test_pack_refuses_float32():
    with pytest.raises(ValueError, match="float16/bfloat16"):
        pack_2to4(pruned_2to4(32, 64, torch.float32))


# --- in-memory model ----------------------------------------------------------------------------------


def test_to_torchao_in_memory_without_sidecar_on_cpu():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))
    with torch.no_grad():
        model[0].weight.copy_(pruned_2to4(32, 64, torch.float32))
    report = to_torchao_(model, CPU)
    assert report.layer("0").status == READY and report.layer("0").roundtrip is True
    assert report.layer("2").status == DENSE and "not 2:4 as stored" in report.layer("2").reason
    assert report.layer("2").problem is None  # nothing claimed it was pruned
    assert model[0].weight.dtype == torch.bfloat16
    assert any("needs a CUDA GPU" in note for note in report.notes)
    assert report.to_dict()["counts"] == {CONVERTED: 0, READY: 1, DENSE: 1}


def test_config_rejects_fp8_on_cusparselt_and_unknown_values():
    with pytest.raises(ValueError, match="CUTLASS"):
        TorchaoExportConfig(dtype="fp8", backend="cusparselt")
    with pytest.raises(ValueError, match="unknown export dtype"):
        TorchaoExportConfig(dtype="int4")
    assert TorchaoExportConfig(dtype="fp8").backend == "cutlass"
    assert TorchaoExportConfig(dtype="bf16").backend == "cusparselt"


def test_gpu_blocker_names_what_the_device_lacks(monkeypatch):
    from nmperm_plugin.export import torchao as ao

    assert "needs a CUDA GPU" in ao.gpu_blocker(TorchaoExportConfig(dtype="bf16"), torch.device("cpu"))
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    assert ao.gpu_blocker(TorchaoExportConfig(dtype="bf16"), cuda) is None
    assert "SM 9.x" in ao.gpu_blocker(TorchaoExportConfig(dtype="fp8"), cuda)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    assert "--backend cutlass" in ao.gpu_blocker(TorchaoExportConfig(dtype="bf16"), cuda)
    assert ao.gpu_blocker(TorchaoExportConfig(dtype="bf16", backend="cutlass"), cuda) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert "--backend cusparselt" in ao.gpu_blocker(TorchaoExportConfig(dtype="bf16", backend="cutlass"), cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "SM 8.0+" in ao.gpu_blocker(TorchaoExportConfig(dtype="bf16", backend="cutlass"), cuda)


def _convert_with(monkeypatch, fake_apply) -> tuple[nn.Module, torch.Tensor, object]:
    """Run to_torchao_ on CPU as if on a GPU, with ``fake_apply`` standing in for torchao."""
    from nmperm_plugin.export import torchao as ao

    model = nn.Sequential(nn.Linear(64, 32))
    with torch.no_grad():
        model[0].weight.copy_(pruned_2to4(32, 64, torch.float32))
    dense = model[0].weight.detach().bfloat16().clone()
    monkeypatch.setattr(ao, "gpu_blocker", lambda config, device: None)
    monkeypatch.setattr(ao, "torchao_config", lambda config: "ao-config")
    monkeypatch.setattr(ao, "is_converted", lambda weight, fp8: True)
    monkeypatch.setattr(ao, "apply_torchao_", fake_apply)
    return model, dense, to_torchao_(model, CPU)


def test_conversion_is_verified_and_undone_when_wrong(monkeypatch):
    def corrupt(model, path, ao_config, fp8):
        assert (path, ao_config, fp8) == ("0", "ao-config", False)
        model[0].weight = nn.Parameter(torch.zeros_like(model[0].weight), requires_grad=False)

    model, dense, report = _convert_with(monkeypatch, corrupt)
    assert report.layer("0").status == DENSE
    assert report.layer("0").reason == "converted weight did not reproduce the dense weight: restored dense"
    assert torch.equal(model[0].weight, dense)


def test_conversion_error_leaves_the_layer_dense(monkeypatch):
    def refuse(model, path, ao_config, fp8):
        raise RuntimeError("Error original_tensor.shape is not supported!\nmore")

    model, dense, report = _convert_with(monkeypatch, refuse)
    assert report.layer("0").status == DENSE
    assert report.layer("0").reason == "conversion refused it: Error original_tensor.shape is not supported!"
    assert torch.equal(model[0].weight, dense)


def test_faithful_conversion_is_reported_converted(monkeypatch):
    model, dense, report = _convert_with(monkeypatch, lambda model, path, ao_config, fp8: None)
    assert report.layer("0").status == CONVERTED and report.layer("0").reason == ""
    assert report.counts()[CONVERTED] == 1 and not report.notes


# --- checkpoints --------------------------------------------------------------------------------------------


def test_export_checkpoint_tiny_llama_on_cpu(checkpoint):
    from transformers import AutoModelForCausalLM

    model, report = export_checkpoint(checkpoint, CPU)
    assert report.ok and not report.missing
    pruned = set(pruned_names())
    for layer in report.layers:
        if layer.name in pruned:
            assert (layer.status, layer.roundtrip, layer.nm_ok) == (READY, True, True), layer
        else:
            assert layer.status == DENSE and layer.reason == "not pruned (not listed in the sidecar)"
    assert {layer.name for layer in report.layers} == pruned | {"lm_head"}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(model, ids), logits(reference, ids))


def test_export_checkpoint_float32_reports_dtype(checkpoint):
    _, report = export_checkpoint(checkpoint, TorchaoExportConfig(device="cpu"))
    pruned = [layer for layer in report.layers if layer.pruned]
    assert len(pruned) == 14
    assert all(layer.status == DENSE and layer.reason == "dtype float32: convert with --dtype bf16" for layer in pruned)
    assert report.ok  # float32 is a reason to stay dense, not a broken checkpoint


def test_layer_listed_but_not_nm_and_unknown_layer_fail_the_check(tmp_path):
    model = tiny_llama()
    names = pruned_names()
    prune_model_(model, [name for name in names if name != "model.layers.1.mlp.down_proj"])
    frames = {name: None for name in names} | {"model.layers.7.mlp.down_proj": None}
    write_checkpoint(tmp_path, model, frames=frames)
    _, report = export_checkpoint(tmp_path, CPU)
    assert [layer.name for layer in report.problems] == ["model.layers.1.mlp.down_proj"]
    assert report.missing == ["model.layers.7.mlp.down_proj"]
    assert not report.ok
    assert report.layer("model.layers.1.mlp.down_proj").status == DENSE


def _wrap_o_proj_with_gathers(perms: dict[int, torch.Tensor]):
    """A stand-in for ``apply_gather`` that realises an ``attn_out`` permutation per layer with GatherLinear."""
    from nmperm_plugin.learn.fold import GatherLinear

    calls = []

    def fake_apply_gather(model, sidecar):
        calls.append(sidecar.fold)
        for i, layer in enumerate(model.model.layers):
            linear = layer.self_attn.o_proj
            with torch.no_grad():
                linear.weight.data = linear.weight.data[:, perms[i]].contiguous()
            layer.self_attn.o_proj = GatherLinear(linear, perms[i])
        return model

    return fake_apply_gather, calls


def test_gather_checkpoint_gets_its_gathers_before_validation(tmp_path, monkeypatch):
    import nmperm_plugin.learn.fold as fold

    model = tiny_llama()
    names = pruned_names()
    prune_model_(model, [name for name in names if not name.endswith("o_proj")])
    perms = {i: torch.randperm(64, generator=torch.Generator().manual_seed(i)) for i in range(2)}
    with torch.no_grad():  # store o_proj in original order, 2:4 only under its permutation (SPEC 3)
        for i, layer in enumerate(model.model.layers):
            weight = layer.self_attn.o_proj.weight
            permuted = weight[:, perms[i]]
            weight[:, perms[i]] = permuted * nm_mask(permuted.abs(), TWO_FOUR)
    frames = {name: None for name in names}
    frames |= {f"model.layers.{i}.self_attn.o_proj": f"layers.{i}.attn_out" for i in range(2)}
    permutations = {f"layers.{i}.attn_out": perms[i].tolist() for i in range(2)}  # the sites the frames name
    write_checkpoint(tmp_path, model, fold="gather", frames=frames, permutations=permutations)
    fake, calls = _wrap_o_proj_with_gathers(perms)
    monkeypatch.setattr(fold, "apply_gather", fake)
    exported, report = export_checkpoint(tmp_path, CPU)
    assert calls == ["gather"]
    assert report.ok
    o_proj = report.layer("model.layers.0.self_attn.o_proj")
    assert (o_proj.status, o_proj.roundtrip) == (READY, True)
    assert report.gathers == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(exported, ids), logits(reference, ids), atol=3e-2, rtol=3e-2)


def test_gather_checkpoint_without_gathers_is_reported_not_converted(tmp_path, monkeypatch):
    import nmperm_plugin.learn.fold as fold

    model = tiny_llama()
    prune_model_(model, pruned_names())
    with torch.no_grad():
        weight = model.model.layers[0].self_attn.o_proj.weight
        weight.copy_(weight[:, torch.randperm(64, generator=torch.Generator().manual_seed(3))])
    write_checkpoint(tmp_path, model, fold="gather")
    monkeypatch.setattr(fold, "apply_gather", lambda model, sidecar: model)  # a gather that does nothing
    _, report = export_checkpoint(tmp_path, CPU)
    layer = report.layer("model.layers.0.self_attn.o_proj")
    assert layer.status == DENSE and "apply_gather" in layer.reason
    assert not report.ok


def test_real_apply_gather_makes_every_pruned_layer_2to4(tmp_path):
    from nmperm_plugin.plugins.registry import get_adapter

    model = tiny_llama()
    modules = dict(model.named_modules())
    frames, permutations = {}, {}
    with torch.no_grad():
        for site in get_adapter(model).sites(model, "gather"):
            perm = torch.randperm(site.channels, generator=torch.Generator().manual_seed(len(permutations)))
            permutations[site.name] = perm.tolist()
            for name in site.linears:
                weight = modules[name].weight
                permuted = weight[:, perm]
                weight[:, perm] = permuted * nm_mask(permuted.abs(), TWO_FOUR)
                frames[name] = site.name
    write_checkpoint(tmp_path, model, fold="gather", frames=frames, permutations=permutations)
    exported, report = export_checkpoint(tmp_path, CPU)
    assert report.ok and report.gathers
    assert all(layer.status == READY for layer in report.layers if layer.pruned)
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(logits(exported, ids), logits(reference, ids), atol=3e-2, rtol=3e-2)


# --- CLI --------------------------------------------------------------------------------------------------


def test_cli_text_and_json(checkpoint, capsys):
    assert cli(["export", str(checkpoint), "--to", "torchao", "--dtype", "bf16", "--check"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in out
    assert ("needs a CUDA GPU" in out) != torch.cuda.is_available()
    assert cli(["export", str(checkpoint), "--dtype", "bf16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = {CONVERTED: 14, READY: 0, DENSE: 1} if torch.cuda.is_available() else {CONVERTED: 0, READY: 14, DENSE: 1}
    assert data["counts"] == expected and data["ok"] is True


def test_cli_check_fails_on_a_listed_layer_that_is_not_nm(tmp_path, capsys):
    model = tiny_llama()
    prune_model_(model, pruned_names()[1:])  # q_proj of layer 0 listed but left dense
    write_checkpoint(tmp_path, model)
    assert cli(["export", str(tmp_path), "--dtype", "bf16"]) == 0
    assert cli(["export", str(tmp_path), "--dtype", "bf16", "--check"]) == 1
    assert "check failed" in capsys.readouterr().err


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    assert cli(["export", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    tiny_llama().save_pretrained(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli(["export", str(tmp_path), "--check"]) == 2
    assert SIDECAR_NAME in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_rejects_fp8_with_cusparselt(checkpoint, capsys):
    assert cli(["export", str(checkpoint), "--dtype", "fp8", "--backend", "cusparselt"]) == 2
    assert "CUTLASS" in capsys.readouterr().err


# --- GPU ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_gpu_semi_sparse_linear_matches_dense(backend):
    model = nn.Sequential(nn.Linear(256, 128)).cuda().bfloat16()
    with torch.no_grad():
        model[0].weight.copy_(pruned_2to4(128, 256).cuda())
    x = torch.randn(4, 7, 256, device="cuda", dtype=torch.bfloat16)
    expected = model(x)
    report = to_torchao_(model, TorchaoExportConfig(dtype="bf16", backend=backend))
    if backend == "cutlass" and torch.cuda.get_device_capability()[0] != 8:  # torch's kernel is SM 8.x only
        assert report.layer("0").status == READY and "--backend cusparselt" in report.to_text()
        torch.testing.assert_close(model(x), expected)
        return
    assert report.layer("0").status == CONVERTED, report.to_text()
    assert isinstance(model[0].weight, torch.sparse.SparseSemiStructuredTensor)
    torch.testing.assert_close(model(x), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
    reason="FP8 2:4 (torchao CUTLASS sm90 kernel) needs an SM 9.x GPU",
)
def test_gpu_fp8_sparse_linear_close_to_dense():
    model = nn.Sequential(nn.Linear(256, 128)).cuda().bfloat16()
    with torch.no_grad():
        model[0].weight.copy_(pruned_2to4(128, 256).cuda())
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    expected = model(x).float()
    report = to_torchao_(model, TorchaoExportConfig(dtype="fp8"))
    assert report.layer("0").status == CONVERTED, report.to_text()
    error = (model(x).float() - expected).norm() / expected.norm()
    assert error < 0.1


@pytest.mark.gpu
@NEEDS_CUDA
def test_gpu_tiny_llama_same_greedy_tokens(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    prune_model_(model, pruned_names())
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # wide logit margins, so greedy decoding has no near-ties
    write_checkpoint(tmp_path, model)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda().eval()
    exported, report = export_checkpoint(tmp_path, TorchaoExportConfig(dtype="bf16"))
    assert report.counts()[CONVERTED] == 14, report.to_text()
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(4)).cuda()
    torch.testing.assert_close(logits(exported, ids), logits(reference, ids), atol=0.25, rtol=5e-2)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(exported.generate(ids, **settings), reference.generate(ids, **settings))


# --- sparsify_: own configs, registry dispatch, refusals ----------------------------------------------


def bf16_model(*shapes: tuple[int, int], pruned: bool = True) -> nn.Sequential:
    """Linears ``(out, in)`` in bf16 on CPU, with 2:4 weights when ``pruned``."""
    model = nn.Sequential(*[nn.Linear(i, o) for o, i in shapes]).bfloat16()
    with torch.no_grad():
        for seed, layer in enumerate(model):
            layer.weight.copy_(pruned_2to4(*layer.weight.shape, seed=seed) if pruned else layer.weight)
    return model


def test_sparsify_configs_are_validated():
    from nmperm_plugin.export import SemiSparseWeightConfig

    assert SemiSparseWeightConfig() == SemiSparseWeightConfig(backend="cusparselt", alg_id=0)
    with pytest.raises(ValueError, match="unknown 2:4 backend"):
        SemiSparseWeightConfig(backend="triton")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="alg_id must be a non-negative int"):
            SemiSparseWeightConfig(alg_id=bad)
    with pytest.raises(ValueError, match="no meaning with backend='cutlass'"):
        SemiSparseWeightConfig(backend="cutlass", alg_id=3)


def test_sparsify_dispatches_on_the_config_type_through_the_registry(monkeypatch):
    from dataclasses import dataclass

    from nmperm_plugin.export import SparsifyConfig, handler_for, register_sparsify_handler, sparsify_
    from nmperm_plugin.export import sparsify as sp

    monkeypatch.setattr(sp, "HANDLERS", dict(sp.HANDLERS))

    @dataclass(frozen=True)
    class MarkConfig(SparsifyConfig):
        tag: str = "x"

    @dataclass(frozen=True)
    class LouderMarkConfig(MarkConfig):
        pass

    calls = []
    handler = register_sparsify_handler(
        MarkConfig,
        blocker=lambda config, device: None,
        validate=lambda module, config: [],
        convert=lambda module, config: calls.append((type(module).__name__, config.tag)),
    )
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    assert sparsify_(model, MarkConfig("a")) == ["0", "2"]
    assert calls == [("Linear", "a"), ("Linear", "a")]
    assert handler_for(LouderMarkConfig()) is handler  # a subclass finds its base's handler
    assert sparsify_(model, LouderMarkConfig("b"), filter_fn=lambda module, fqn: fqn == "2") == ["2"]
    assert calls[-1] == ("Linear", "b")
    with pytest.raises(ValueError, match="already has a sparsify handler"):
        register_sparsify_handler(MarkConfig, blocker=None, validate=None, convert=None)
    with pytest.raises(TypeError, match="no handler for object: pass one of .*SemiSparseWeightConfig"):
        sparsify_(model, object())


def test_sparsify_semi_sparse_on_cpu_refuses_and_leaves_the_model_alone():
    from nmperm_plugin.export import SemiSparseWeightConfig, SparsifyError, sparsify_

    model = bf16_model((32, 64), (64, 32))
    before = [layer.weight.detach().clone() for layer in model]
    with pytest.raises(SparsifyError, match="needs the weights on a CUDA GPU.*to_torchao_ validates every layer"):
        sparsify_(model, SemiSparseWeightConfig())
    for layer, weight in zip(model, before, strict=True):
        assert type(layer.weight) is nn.Parameter and torch.equal(layer.weight, weight)


def test_sparsify_strict_lists_every_invalid_layer_and_converts_nothing():
    from nmperm_plugin.export import SemiSparseWeightConfig, SparsifyError, sparsify_

    model = bf16_model((32, 64), (24, 32))  # layer 1: out_features 24 is not a multiple of 16
    with torch.no_grad():
        model.append(nn.Linear(64, 32))  # float32 and dense
    with pytest.raises(SparsifyError) as error:
        sparsify_(model, SemiSparseWeightConfig())
    text = str(error.value)
    assert "2 of 3 selected layers cannot take SemiSparseWeightConfig, so nothing was converted" in text
    assert "1: out_features 24 not a multiple of 16 required by cuSPARSELt" in text
    assert "2: not 2:4: " in text and "dtype float32: cast the model to bfloat16" in text
    assert "0:" not in text
    # not strict: the invalid layers are skipped, the valid one still needs CUDA
    with pytest.raises(SparsifyError, match="needs the weights on a CUDA GPU"):
        sparsify_(model, SemiSparseWeightConfig(), strict=False)
    assert sparsify_(model, SemiSparseWeightConfig(), filter_fn=lambda m, fqn: fqn == "2", strict=False) == []


def test_fp8_sparsify_validates_and_refuses_on_cpu():
    from nmperm_plugin.export import Float8SemiSparseWeightConfig, SparsifyError, sparsify_
    from nmperm_plugin.export.sparsify import fp8_validate

    half = nn.Linear(48, 32).half()
    with torch.no_grad():
        half.weight.copy_(pruned_2to4(32, 48, torch.float16))
    reasons = fp8_validate(half, Float8SemiSparseWeightConfig())
    assert reasons == [
        "dtype float16: FP8 per-row quantization needs bfloat16 weights",
        "in_features 48 not a multiple of 32 required by FP8 2:4 CUTLASS",
    ]
    with pytest.raises(SparsifyError, match="Float8SemiSparseWeightConfig needs the weights on a CUDA GPU"):
        sparsify_(bf16_model((32, 64)), Float8SemiSparseWeightConfig())


def test_export_needs_no_torchao_sparsity(monkeypatch):
    """torchao's main branch deleted torchao.sparsity: nothing here imports it, and the export still works."""
    import re
    import sys
    from pathlib import Path

    import nmperm_plugin
    from nmperm_plugin.export import SemiSparseWeightConfig, SparsifyError, sparsify_

    root = Path(nmperm_plugin.__file__).resolve().parent.parent
    sources = list((root / "nmperm_plugin").rglob("*.py")) + list((root / "bench").glob("*.py"))
    code_import = re.compile(r"^\s*(from|import)\s+torchao\.sparsity", re.MULTILINE)  # not docstrings/comments
    importing = [p.name for p in sources if code_import.search(p.read_text())]
    assert importing == []
    monkeypatch.setitem(sys.modules, "torchao.sparsity", None)  # as if removed: importing it would fail
    model = bf16_model((32, 64))
    report = to_torchao_(model, CPU)
    assert report.layer("0").status == READY and report.layer("0").roundtrip is True
    with pytest.raises(SparsifyError, match="CUDA"):
        sparsify_(model, SemiSparseWeightConfig())


# --- serve: configuration, refusals without CUDA ---------------------------------------------------------

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def test_serve_config_validation():
    from nmperm_plugin.export import ServeConfig, parse_shape

    assert parse_shape("4x2048") == (4, 2048) and parse_shape((1, 8)) == (1, 8)
    for bad in ("4by2048", "4x", "0x16", (1, 2, 3), (1.0, 8)):
        with pytest.raises(ValueError, match="input shape"):
            parse_shape(bad)
    config = ServeConfig(shapes=["1x2048", (4, 2048), "1x2048", "8x1"])
    assert config.shapes == ((1, 2048), (4, 2048), (8, 1)) and config.token_counts == [8192, 2048, 8]
    for kwargs, match in (
        (dict(shapes=()), "shapes is empty"),
        (dict(shapes="1x2048"), "list of"),
        (dict(mode="eager"), "unknown serve mode"),
        (dict(tune="guess"), "unknown tune method"),
        (dict(warmup=-1), "warmup must be an int >= 0"),
        (dict(tune_repeats=0), "tune_repeats must be an int >= 1"),
    ):
        with pytest.raises(ValueError, match=match):
            ServeConfig(**kwargs)


@NO_CUDA
def test_serve_refuses_without_cuda_naming_what_is_missing():
    from nmperm_plugin.export import CusparseltLinear, GraphRunner, ServeError, prepare_linears_, serve

    model = bf16_model((32, 64))
    for call in (
        lambda: serve(model),
        lambda: prepare_linears_(model, [8]),
        lambda: CusparseltLinear(model[0].weight),
        lambda: GraphRunner(model, [torch.zeros(1, 64)]),
    ):
        with pytest.raises(ServeError, match="needs a CUDA GPU: CUDA graphs and the cuSPARSELt"):
            call()


def test_cusparselt_linear_lists_why_a_weight_cannot_be_served():
    from nmperm_plugin.export import CusparseltLinear

    reasons = CusparseltLinear.problems(torch.randn(24, 40))
    assert any("needs the weights on a CUDA GPU" in reason for reason in reasons) != torch.cuda.is_available()
    assert any(reason.startswith("not 2:4") for reason in reasons)
    assert reasons[-1] == "dtype torch.float32: cast the model to bfloat16 or float16 first"
    shapes = CusparseltLinear.problems(pruned_2to4(24, 48))
    assert "out_features 24 not a multiple of 16 required by cuSPARSELt" in shapes
    assert CusparseltLinear.problems(torch.zeros(2, 3, 4)) == ["weight must be 2-D, got shape (2, 3, 4)"]


def test_algorithm_choice_keys_and_candidates(monkeypatch):
    from nmperm_plugin import compat
    from nmperm_plugin.export import cusparselt as sv

    assert sv.padded_rows(1, 8) == 8 and sv.padded_rows(64, 8) == 64 and sv.padded_rows(65, 8) == 72
    assert sv.alg_key(2048, 8192, 64, torch.bfloat16, False) == (2048, 8192, 64, "bfloat16", False)
    monkeypatch.setattr(compat, "cusparselt_max_alg_id", lambda: 3)
    assert sv.alg_candidates(None) == [0, 1, 2, 3] and sv.alg_candidates(2) == [0, 1, 2, 3]
    assert sv.alg_candidates(7) == [0, 1, 2, 3, 7]
    monkeypatch.setattr(compat, "cusparselt_max_alg_id", lambda: None)
    assert sv.alg_candidates(5) == [0, 5] and sv.alg_candidates(None) == [0]
    assert sv.choose_alg_id(None, 16, 16, 8, torch.bfloat16, None, method="off") == 0
    with pytest.raises(ValueError, match="unknown tune method"):
        sv.choose_alg_id(None, 16, 16, 8, torch.bfloat16, None, method="fast")


def test_logits_forward_keeps_the_last_position_of_a_causal_lm():
    from nmperm_plugin.export.serving import logits_forward

    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(7))
    last = logits_forward(model, logits_to_keep=1)(ids)
    assert last.shape == (2, 1, 128)
    torch.testing.assert_close(last, logits(model, ids)[:, -1:])
    assert logits_forward(model, logits_to_keep=0)(ids).shape == (2, 6, 128)
    plain = nn.Embedding(128, 4)
    assert logits_forward(plain, logits_to_keep=1)(ids).shape == (2, 6, 4)


@NO_CUDA
def test_cli_serve_without_cuda_exits_2_before_loading(checkpoint, capsys):
    assert cli(["export", str(checkpoint), "--dtype", "bf16", "--serve"]) == 2
    err = capsys.readouterr().err
    assert "nmperm export --serve needs a CUDA GPU" in err
    assert cli(["export", str(checkpoint), "--serve", "--serve-shapes", "4by2048"]) == 2
    assert "is not BATCHxTOKENS" in capsys.readouterr().err


def test_serve_speed_script_parses_and_refuses_without_cuda(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "serve_speed.py"
    spec = importlib.util.spec_from_file_location("serve_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as done:
        bench.main(["--help"])
    assert done.value.code == 0 and "--prefill" in capsys.readouterr().out
    args = bench.parse_args(["--models", "llama-3.2-1b", "--prefill", "1x2048", "--decode", "1", "8"])
    assert args.prefill == [(1, 2048)] and args.decode == [1, 8]
    with pytest.raises(SystemExit):
        bench.parse_args(["--prefill", "2048"])
    if not torch.cuda.is_available():
        assert bench.main(["--models", "llama-3.2-1b"]) == 2
        assert "no CUDA GPU found" in capsys.readouterr().err


# --- GPU: sparsify_, CusparseltLinear, serve ---------------------------------------------------------------


@pytest.mark.gpu
@NEEDS_CUDA
def test_gpu_sparsify_semi_sparse_matches_dense():
    from nmperm_plugin.export import SemiSparseWeightConfig, sparsify_

    model = bf16_model((128, 256)).cuda()
    x = torch.randn(4, 7, 256, device="cuda", dtype=torch.bfloat16)
    expected = model(x)
    assert sparsify_(model, SemiSparseWeightConfig()) == ["0"]
    assert isinstance(model[0].weight, torch.sparse.SparseSemiStructuredTensor)
    torch.testing.assert_close(model(x), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.skipif(
    not torch.cuda.is_available() or not torch.backends.cusparselt.is_available(), reason="needs cuSPARSELt"
)
@pytest.mark.parametrize("tune", ["time", "search", "off"])
def test_gpu_cusparselt_linear_matches_dense(tune):
    from nmperm_plugin.export import CusparseltLinear
    from nmperm_plugin.export.serving import GraphRunner

    dense = bf16_model((128, 256)).cuda()[0]
    layer = CusparseltLinear.from_linear(dense)
    algs = layer.tune_([1, 7, 64], tune, repeats=3)
    assert set(algs) == {8, 64}
    for tokens in (1, 7, 64):
        x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(layer(x), dense(x), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(GraphRunner(layer, [x])(x), dense(x), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("mode", ["cuda_graph", "compile"])
def test_gpu_serve_tiny_llama_matches_the_dense_model(mode):
    from nmperm_plugin.export import ServeConfig, check_served, serve

    model = tiny_llama()
    prune_model_(model, pruned_names())
    model = model.bfloat16().cuda()
    reference = tiny_llama()
    prune_model_(reference, pruned_names())
    reference = reference.bfloat16().cuda()
    report = to_torchao_(model, TorchaoExportConfig(dtype="bf16"))
    assert report.counts()[CONVERTED] == 14, report.to_text()
    served = serve(model, ServeConfig(shapes=["1x16", "2x8"], mode=mode, tune="time", tune_repeats=3))
    assert served.describe()["cusparselt_layers"] == (14 if torch.backends.cusparselt.is_available() else 0)
    for shape in ((1, 16), (2, 8)):
        ids = torch.randint(0, 128, shape, device="cuda")
        torch.testing.assert_close(served(ids), logits(reference, ids)[:, -1:], atol=0.1, rtol=5e-2)
    rows = check_served(served, repeats=3)
    assert [row["shape"] for row in rows] == ["1x16", "2x8"] and all(row["rel_err"] < 1e-2 for row in rows)


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
    reason="FP8 2:4 (torchao CUTLASS sm90 kernel) needs an SM 9.x GPU",
)
def test_gpu_fp8_sparsify_through_torchao():
    from nmperm_plugin import compat
    from nmperm_plugin.export import Float8SemiSparseWeightConfig, sparsify_

    model = bf16_model((128, 256)).cuda()
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    expected = model(x).float()
    assert sparsify_(model, Float8SemiSparseWeightConfig()) == ["0"]
    assert isinstance(model[0].weight, compat.torchao_fp8_sparse_types())
    assert (model(x).float() - expected).norm() / expected.norm() < 0.1
