import json

import pytest
import torch
from conftest import assert_same_function, tiny_model, unsupported_model
from transformers import AutoModelForCausalLM

from nmperm_plugin.cli.commands import main
from nmperm_plugin.io.sidecar import Sidecar

FAST = ["--num-samples", "4", "--seq-len", "32", "--block-size", "16", "--steps-per-layer", "2"]
FAST += ["--end-to-end-steps", "2"]


def _logits(directory, ids):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype="float32").eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def ids():
    return torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("fold", ["exact", "gather"])
def test_permute_only_keeps_logits(saved_model, tmp_path, ids, fold):
    model_dir, text = saved_model
    out = tmp_path / "permuted"
    assert (
        main(
            [
                "prune",
                str(model_dir),
                "--dataset",
                str(text),
                "--output",
                str(out),
                "--permute-only",
                "--fold",
                fold,
                *FAST,
            ]
        )
        == 0
    )
    assert_same_function(_logits(out, ids), _logits(model_dir, ids))
    if fold == "exact":
        before = AutoModelForCausalLM.from_pretrained(model_dir).model.layers[0].mlp.down_proj.weight
        after = AutoModelForCausalLM.from_pretrained(out).model.layers[0].mlp.down_proj.weight
        assert not torch.equal(before, after)


@pytest.mark.parametrize("fold", ["exact", "gather"])
def test_prune_writes_verifiable_checkpoint(saved_model, tmp_path, capsys, fold):
    model_dir, text = saved_model
    out = tmp_path / "pruned"
    assert (
        main(
            [
                "prune",
                str(model_dir),
                "--dataset",
                str(text),
                "--output",
                str(out),
                "--fold",
                fold,
                "--eval-dataset",
                str(text),
                "--eval-samples",
                "2",
                *FAST,
            ]
        )
        == 0
    )
    sidecar = Sidecar.load(out)
    assert sidecar.fold == fold and sidecar.pattern == "2:4" and len(sidecar.frames) == 14
    assert sidecar.figures["perplexity"] > 1
    assert (sidecar.frames["model.layers.0.self_attn.o_proj"] is None) == (fold == "exact")
    capsys.readouterr()
    assert main(["verify", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and len(report["checks"]) >= 4


def test_verify_catches_a_broken_weight(saved_model, tmp_path):
    model_dir, text = saved_model
    out = tmp_path / "pruned"
    assert main(["prune", str(model_dir), "--dataset", str(text), "--output", str(out), "--method", "ria", *FAST]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, :4] = 1.0  # a full group of four: breaks 2:4
    model.save_pretrained(out)
    assert main(["verify", str(out)]) == 1


def test_refuses_to_overwrite(saved_model, tmp_path, capsys):
    model_dir, text = saved_model
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["prune", str(model_dir), "--dataset", str(text), "--output", str(out), "--method", "identity", *FAST]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    # issue 19: --overwrite replaces only a directory nmperm wrote (or an empty one), never a user's folder
    assert main([*args, "--overwrite"]) == 2
    assert "replaces only a directory nmperm wrote" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert main(args) == 0 and (out / "nmperm.json").exists()  # an empty directory is filled
    assert main(args) == 2 and main([*args, "--overwrite"]) == 0  # an nmperm output is replaced
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".busy")) == []


def _nan_model(tmp_path, tokenizer):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    path = tmp_path / "nan-model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _unsupported(tmp_path, tokenizer):
    path = tmp_path / "gpt-neox"
    unsupported_model().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "case,needle",
    [
        ("pattern 4:2", "0 < N < M"),
        ("pattern abc", "'N:M'"),
        ("pattern 2:3", "not divisible by M=3"),
        ("missing model", "does not exist"),
        ("empty dataset", "is empty"),
        ("nan weights", "NaN"),
        ("unsupported", "unsupported architecture 'gpt_neox'"),
        ("too little text", "lower --num-samples"),
        ("device gpu0", "not a torch device"),
        ("device cuda", "no CUDA GPU"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(saved_model, tmp_path, tokenizer, capsys, case, needle):
    model_dir, text = saved_model
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    out = tmp_path / "never"
    model, dataset, extra = str(model_dir), str(text), []
    if case.startswith("pattern"):
        extra = ["--pattern", case.split()[1], "--block-size", "12" if case.endswith("2:3") else "16"]
    elif case == "missing model":
        model = str(tmp_path / "nowhere")
    elif case == "empty dataset":
        dataset = str(empty)
    elif case == "nan weights":
        model = str(_nan_model(tmp_path, tokenizer))
    elif case == "unsupported":
        model = str(_unsupported(tmp_path, tokenizer))
    elif case == "too little text":
        extra = ["--num-samples", "100000"]
    elif case.startswith("device"):
        if case.endswith("cuda") and torch.cuda.is_available():
            pytest.skip("this machine has a CUDA GPU, so --device cuda is valid")
        extra = ["--device", case.split()[1]]
    args = [
        "prune",
        model,
        "--dataset",
        dataset,
        "--output",
        str(out),
        "--method",
        "identity",
        "--num-samples",
        "4",
        "--seq-len",
        "32",
        *extra,
    ]
    assert main(args) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()
    assert not any(p.name.startswith(".never") for p in tmp_path.iterdir())


def test_eval_json(saved_model, capsys):
    model_dir, text = saved_model
    assert (
        main(["eval", str(model_dir), "--dataset", str(text), "--num-samples", "2", "--seq-len", "32", "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] > 1 and result["tokens"] == 64


def test_missing_sidecar_is_explained(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    assert main(["verify", str(tmp_path / "plain")]) == 2
    assert "not written by nmperm" in capsys.readouterr().err


def test_corpus_is_shipped_and_disjoint():
    from nmperm_plugin.data.text import load_texts

    calibration, evaluation = load_texts("builtin:wiki-calibration")[0], load_texts("builtin:wiki-evaluation")[0]
    assert len(calibration) > 150_000 and len(evaluation) > 150_000
    titles = lambda text: {block.split("\n", 1)[0] for block in text.split("\n\n\n")}  # noqa: E731
    assert not (titles(calibration) & titles(evaluation)) - {""}


def test_train_dtype_reaches_the_config_and_bad_values_are_refused(saved_model, tmp_path, monkeypatch, capsys):
    import nmperm_plugin.cli.prune as cli

    model_dir, text = saved_model
    seen = []

    def record(model, ids, config, device=None, **options):
        seen.append(config.train_dtype)
        raise ValueError("stopped after reading the config")

    monkeypatch.setattr(cli, "permute_", record)
    argv = ["prune", str(model_dir), "--dataset", str(text), "--output", str(tmp_path / "out"), *FAST]
    assert main([*argv, "--objective", "end_to_end", "--train-dtype", "float32"]) == 2
    assert seen == ["float32"]
    with pytest.raises(SystemExit):
        main([*argv, "--train-dtype", "half"])
    assert "invalid choice: 'half'" in capsys.readouterr().err
