"""Resumable learning (issue 15, item 6): an interrupted run, resumed, finds exactly the
permutations of an uninterrupted one; a different setup is refused with what differs; a run killed
during learning (SIGINT, SIGKILL) leaves the output absent or the previous one, never partial, and
its learning state, which the same command resumes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from nmperm_plugin import PermuteConfig, permute_and_prune_
from nmperm_plugin.cli.commands import main
from nmperm_plugin.io.verify import verify_checkpoint
from nmperm_plugin.learn import losses as objectives
from nmperm_plugin.runtime import resume

CASES = {
    "end_to_end": dict(objective="end_to_end", end_to_end_steps=7),
    "layerwise": dict(objective="layerwise", steps_per_layer=5),  # phases: one per decoder layer
}
COMMON = dict(block_size=16, sequences_per_step=2, select_sequences=2, select_every=2, seed=5, lr=0.5)
LOSSES = {"end_to_end": objectives.WindowObjective, "layerwise": objectives.LayerwiseObjective}


class Interrupted(KeyboardInterrupt):
    pass


def _ids() -> torch.Tensor:
    return torch.randint(0, 300, (6, 32), generator=torch.Generator().manual_seed(2))


def _run(config: PermuteConfig, directory: Path | None = None, resume_it: bool = True, every: int = 2):
    """Permutations and learning curves of ``config`` on a fresh tiny model, resumable from ``directory``."""
    model, ids = tiny_model(seed=4), _ids()
    if directory is None:
        result = permute_and_prune_(model, ids, config)
    else:
        with resume.resumable(directory, model, ids, config, resume=resume_it, every_steps=every):
            result = permute_and_prune_(model, ids, config)
    return {k: v.tolist() for k, v in result.perms.items()}, result.history


def _interrupt_after(monkeypatch, cls, calls: int) -> list[int]:
    """Make ``cls.loss`` raise after ``calls`` calls (of every phase together); returns the call counter."""
    real, counter = cls.loss, [0]

    def loss(self, weights, step):
        counter[0] += 1
        if counter[0] > calls:
            raise Interrupted
        return real(self, weights, step)

    monkeypatch.setattr(cls, "loss", loss)
    return counter


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_gives_the_permutations_of_an_uninterrupted_one(case, tmp_path, monkeypatch, one_thread):
    config = PermuteConfig(**COMMON, **CASES[case])
    expected = _run(config)
    state = tmp_path / "out.nmperm-state"
    with monkeypatch.context() as patch:
        # end_to_end: killed in step 6 of 7 (saved after 2 and 4); layerwise: in layer 1's step 4
        _interrupt_after(patch, LOSSES[case], 5 if case == "end_to_end" else 8)
        with pytest.raises(Interrupted):
            _run(config, state)
    assert resume.is_state_dir(state) and (state / "current.pt").exists()
    assert len(list(state.glob("phase-*.pt"))) == (0 if case == "end_to_end" else 1)
    with monkeypatch.context() as patch:
        counter = _interrupt_after(patch, LOSSES[case], 10**6)
        resumed = _run(config, state)
    assert resumed == expected  # permutations and every learning curve, bit for bit
    # only what was not saved is computed again: end_to_end from step 4 (3 steps); layerwise: layer 1
    # from step 2 (3 steps), and neither layer 0 nor the global site again
    assert counter[0] == 3


def test_interrupted_before_any_save_starts_over_and_matches(tmp_path, monkeypatch, one_thread):
    config = PermuteConfig(**COMMON, **CASES["end_to_end"])
    expected = _run(config)
    state = tmp_path / "s.nmperm-state"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, objectives.WindowObjective, 1)
        with pytest.raises(Interrupted):
            _run(config, state)
    assert not state.exists()  # nothing saved yet: created at the first save only
    assert _run(config, state) == expected


def test_a_different_setup_is_refused_with_what_differs_and_no_resume_starts_over(tmp_path, monkeypatch, one_thread):
    config = PermuteConfig(**COMMON, **CASES["end_to_end"])
    state = tmp_path / "out.nmperm-state"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, objectives.WindowObjective, 3)
        with pytest.raises(Interrupted):
            _run(config, state)
    other = PermuteConfig(**(COMMON | CASES["end_to_end"] | {"lr": 0.25}))
    with pytest.raises(resume.ResumeMismatchError, match=r"lr 0\.5 there, 0\.25 now.*resume=False"):
        _run(other, state)
    model = tiny_model(seed=4)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1
    store = resume.ResumeStore(state, resume.fingerprint(model, _ids(), config))
    with pytest.raises(resume.ResumeMismatchError, match="the model's weights"):
        store.open()
    store = resume.ResumeStore(state, resume.fingerprint(tiny_model(seed=4), _ids()[:, :16], config))
    with pytest.raises(resume.ResumeMismatchError, match="the calibration data"):
        store.open()
    assert _run(other, state, resume_it=False) == _run(other)  # the old state discarded, a fresh run


def test_a_foreign_directory_is_never_used_nor_deleted(tmp_path):
    foreign = tmp_path / "out.nmperm-state"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    store = resume.ResumeStore(foreign, {"config": {}})
    for resume_it in (True, False):
        with pytest.raises(FileExistsError, match="is not an nmperm learning state"):
            store.open(resume_it)
    with pytest.raises(RuntimeError, match="refusing to delete"):
        store.remove()
    assert (foreign / "notes.txt").read_text() == "mine"


# -- the CLI, killed by a signal during learning ------------------------------------------------------
SLOW_CLI = textwrap.dedent(
    """
    import sys, time
    from nmperm_plugin.learn import losses as objectives
    from nmperm_plugin.cli.commands import main

    real = objectives.WindowObjective.loss

    def slow(self, weights, step):  # a learning step long enough to be killed in
        time.sleep(float(sys.argv[1]))
        return real(self, weights, step)

    objectives.WindowObjective.loss = slow
    sys.exit(main(sys.argv[2:]))
    """
)


def default_sigint() -> None:
    """In the child: SIGINT raises KeyboardInterrupt, even if the test process inherited or set it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


CLI_FAST = ["--num-samples", "4", "--seq-len", "32", "--block-size", "16", "--end-to-end-steps", "12"]
CLI_FAST += ["--sequences-per-step", "2", "--select-sequences", "2", "--lr", "0.5"]


def _cli(tmp_path: Path, model: Path, text: Path, out: Path, delay: float, *extra: str) -> subprocess.Popen:
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    args = [sys.executable, str(script), str(delay), "prune", str(model), "--dataset", str(text), "--output", str(out)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    pipe = subprocess.PIPE
    return subprocess.Popen(
        [*args, *CLI_FAST, *extra], stdout=pipe, stderr=pipe, text=True, env=env, preexec_fn=default_sigint
    )


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _perms(out: Path) -> dict:
    return json.loads((out / "nmperm.json").read_text())["permutations"]


@pytest.fixture(scope="module")
def reference(saved_model_module):
    """An uninterrupted CLI run (seed 1) and an earlier output (seed 0) to be replaced."""
    model, text, root = saved_model_module
    outputs = {seed: root / f"reference-{seed}" for seed in ("0", "1")}
    base = ["prune", str(model), "--dataset", str(text), *CLI_FAST]
    assert main([*base, "--output", str(outputs["0"]), "--seed", "0"]) == 0  # only replaced: any threads
    process = _cli(root, model, text, outputs["1"], 0.0, "--seed", "1")  # compared: 1 thread, as the resumed runs
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    return outputs


@pytest.fixture(scope="module")
def saved_model_module(tmp_path_factory, tokenizer):
    from conftest import TEXT

    root = tmp_path_factory.mktemp("cli-resume")
    directory = root / "tiny-llama"
    tiny_model().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    text = root / "calib.txt"
    text.write_text(TEXT)
    return directory, text, root


def _stderr_of(process: subprocess.Popen) -> str:
    """The end of the stderr of a child that died or outlived its deadline (killed first: no wait is unbounded)."""
    if process.poll() is None:
        process.kill()
    return process.communicate(timeout=60)[1][-2000:]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_in_learning_keeps_the_old_output_and_the_rerun_resumes(saved_model_module, reference, tmp_path, sig):
    model, text, _ = saved_model_module
    out = tmp_path / "out"
    state = resume.state_dir_of(out)
    shutil.copytree(reference["0"], out)  # a previous output, which --overwrite will replace
    before = _tree(out)
    process = _cli(tmp_path, model, text, out, 0.25, "--seed", "1", "--overwrite")
    deadline = time.monotonic() + 240
    while not (state / "current.pt").exists():  # the first save, after 5 of 12 steps
        assert process.poll() is None and time.monotonic() < deadline, _stderr_of(process)
        time.sleep(0.05)
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    if sig == signal.SIGINT:
        assert f"learning state is kept in {state}" in err
    assert _tree(out) == before  # the previous output, untouched
    assert not [p for p in tmp_path.iterdir() if ".nmperm-new-" in p.name]  # nothing half-written
    assert resume.is_state_dir(state)
    process = _cli(tmp_path, model, text, out, 0.0, "--seed", "1", "--overwrite")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert "resuming the interrupted learning" in err and "resuming at step" in err
    assert _perms(out) == _perms(reference["1"])  # what the uninterrupted run found
    assert verify_checkpoint(out).ok and not state.exists()  # the state goes once the output is in place


def test_cli_refuses_a_changed_command_and_no_resume_starts_over(saved_model_module, tmp_path, capsys):
    model, text, _ = saved_model_module
    out = tmp_path / "out"
    state = resume.state_dir_of(out)
    process = _cli(tmp_path, model, text, out, 0.25, "--seed", "1")
    deadline = time.monotonic() + 240
    while not (state / "current.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline, _stderr_of(process)
        time.sleep(0.05)
    process.kill()
    process.wait(timeout=60)
    base = ["prune", str(model), "--dataset", str(text), "--output", str(out), *CLI_FAST, "--seed", "1"]
    assert main([*base, "--lr", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "lr 0.5 there, 0.3 now" in err and "--no-resume" in err and not out.exists()
    assert main([*base, "--lr", "0.3", "--no-resume"]) == 0
    assert "discarding the learning state" in capsys.readouterr().err
    assert verify_checkpoint(out).ok and not state.exists()


def test_the_modifier_resumes_from_its_learning_state_and_deletes_it_once_saved(tmp_path, monkeypatch, one_thread):
    from test_modifier import _state

    from nmperm_plugin.llmcompressor.modifier import LearnedPermutationModifier

    state_dir = tmp_path / "out.nmperm-state"
    fields = dict(block_size=16, sequences_per_step=2, select_sequences=2, select_every=2, end_to_end_steps=7)

    def run(learning_state=None):
        modifier = LearnedPermutationModifier(**fields, learning_state=learning_state)
        model = tiny_model(seed=4)
        modifier.initialize(_state(model))
        return model, {k: v.tolist() for k, v in modifier.result.perms.items()}

    _, expected = run()
    with monkeypatch.context() as patch:
        _interrupt_after(patch, objectives.WindowObjective, 5)  # killed in step 6 of 7, saved after 5
        with pytest.raises(Interrupted):
            run(str(state_dir))
    assert resume.is_state_dir(state_dir) and (state_dir / "current.pt").exists()
    with monkeypatch.context() as patch:
        counter = _interrupt_after(patch, objectives.WindowObjective, 10**6)
        model, resumed = run(str(state_dir))
    assert resumed == expected and counter[0] == 2  # from step 5: the steps 6 and 7 only
    assert state_dir.exists()  # kept until the model is written
    model.save_pretrained(tmp_path / "out")
    assert not state_dir.exists() and (tmp_path / "out" / "nmperm.json").exists()
    with pytest.raises(ValueError, match="must name a directory ending in '.nmperm-state'"):
        LearnedPermutationModifier(**fields, learning_state=str(tmp_path))
