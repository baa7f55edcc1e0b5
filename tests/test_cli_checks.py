"""The CLI's early checks: output paths, --resume, fast rejection without JAX, messages, progress on stderr.

Every rejection below exits with status 2 and a message that names the flag or the path, before any heavy work:
the rejections run in one subprocess (`experiments.cli.main` per case) that records after each case whether JAX
was imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from experiments import cli
from experiments.plans.grammar import load_plan

ROOT = Path(__file__).resolve().parents[1]

_RUNNER = r"""
import contextlib, io, json, sys
from experiments import cli
out = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.main(argv)
        except SystemExit as exit_:
            rc = exit_.code
    out[name] = {"rc": rc, "err": err.getvalue(), "jax": "jax" in sys.modules}
print(json.dumps(out))
"""

#: case → (argv with {file} {tmp} {taken} {empty} placeholders, substrings the message must hold)
CASES = {
    # (a) --out that is an existing file, that lies under a file, or that cannot be created
    "delta --out file": (["delta", "--out", "{file}"], ["--out {file}: exists and is a file"]),
    "rho --out file": (["rho", "--out", "{file}"], ["--out {file}: exists and is a file"]),
    "check-step --out file": (["check-step", "--out", "{file}"], ["--out {file}: exists and is a file"]),
    "demo --out file": (["demo", "--out", "{file}"], ["--out {file}: exists and is a file"]),
    "theorem1 --out file": (["theorem1", "--out", "{file}"], ["--out {file}: exists and is a file"]),
    "theorem2 --out file": (["theorem2", "--out", "{file}"], ["--out {file}: exists and is a file"]),
    "footnote3 --out file": (["footnote3", "--out", "{file}"], ["--out {file}: exists and is a file"]),
    "figures --out file": (["figures", "{tmp}", "--out", "{file}"], ["--out {file}: exists and is a file"]),
    "experiment --out file": (["experiment", "persona", "--out", "{file}"], ["--out {file}: exists and is a file"]),
    "bench rho --out file": (["bench", "rho", "--out", "{file}"], ["--out {file}: exists and is a file"]),
    "bench train --out file": (["bench", "train", "--out", "{file}"], ["--out {file}: exists and is a file"]),
    "delta --out under a file": (
        ["delta", "--out", "{file}/sub"],
        ["--out {file}/sub: cannot create it: {file} exists and is a file"],
    ),
    "delta --out unwritable": (
        ["delta", "--out", "/proc/rmdyn-no-such/out"],
        ["--out /proc/rmdyn-no-such/out: cannot create it: the parent directory /proc is not writable"],
    ),
    "theorem2 --out json is a dir": (["theorem2", "--out", "{tmp}/occupied"], ["theorem2.json is a directory"]),
    # TrainConfig values given with --set: dynamics.training.config is pure Python
    "experiment --set lr=-1": (["experiment", "persona", "--set", "lr=-1", "--out", "{tmp}/o"], ["lr must be > 0"]),
    "experiment --set micro_batch_size": (
        ["experiment", "persona", "--set", "micro_batch_size=3", "--out", "{tmp}/o"],
        ["micro_batch_size=3 must divide batch_size=32"],
    ),
    "experiment occupied": (["experiment", "persona", "--out", "{taken}"], ["already holds the runs ['reward=im']"]),
    # (b) --resume with nothing to resume
    "resume missing": (
        ["experiment", "persona", "--resume", "--out", "{tmp}/nothere"],
        [
            "--resume: nothing to resume: {tmp}/nothere does not exist",
            "reward=im, reward=ex",
            "config.json",
            "checkpoints/",
        ],
    ),
    "resume empty": (
        ["experiment", "persona", "--resume", "--out", "{empty}"],
        ["--resume: nothing to resume in {empty}: it holds no run directories", "checkpoints/"],
    ),
    "resume other runs": (
        ["experiment", "persona", "--set", "reward=ex", "--resume", "--out", "{taken}"],
        ["nothing to resume in {taken}: it holds the runs ['reward=im'], none of this plan's", "reward=ex"],
    ),
    # (c) bad values of every sub-command, rejected before JAX is imported
    "models --check missing": (["models", "--check", "{tmp}/nomodel"], ["--check {tmp}/nomodel: no such model"]),
    "theorem1 --beta": (["theorem1", "--beta", "-1"], ["--beta must be a finite number > 0, got -1.0"]),
    "theorem1 --deltas": (["theorem1", "--deltas", "0.1,x"], ["--deltas must be comma-separated numbers"]),
    "theorem1 --vertices": (["theorem1", "--vertices", "2"], ["--vertices must be >= 3"]),
    "theorem2 --seeds": (["theorem2", "--seeds", "0"], ["--seeds must be >= 1, got 0"]),
    "theorem2 --steps": (["theorem2", "--steps", "0"], ["--steps must be an integer in [1, 2**31), got 0"]),
    "theorem2 --grid": (["theorem2", "--grid", "1"], ["--grid must be an integer >= 2, got 1"]),
    "theorem2 --im-lr": (["theorem2", "--im-lr", "-1"], ["--im-lr must be a finite number > 0"]),
    "theorem2 --lr": (["theorem2", "--lr", "nan"], ["--lr must be a finite number > 0"]),
    "bench": (["bench"], ["rmdyn bench needs a TARGET"]),
    "bench theorem2": (["bench", "theorem2", "--seeds", "0"], ["need --seeds >= 1"]),
    "bench theorem2 --steps": (["bench", "theorem2", "--steps", "0"], ["--steps must be an integer"]),
    "bench delta": (["bench", "delta", "--pairs", "0"], ["--pairs, --chunk-size"]),
    "bench delta --model": (["bench", "delta", "--model", "{tmp}/nomodel"], ["--model {tmp}/nomodel: no such"]),
    "bench rho": (["bench", "rho", "--lengths", "x"], ["--lengths must be comma-separated integers"]),
    "bench train": (["bench", "train", "--pairs", "0"], ["--pairs, --tokens"]),
    "bench eval": (["bench", "eval", "--prompts", "0"], ["--prompts must be in 1…40"]),
    "bench eval --out file": (["bench", "eval", "--out", "{file}"], ["--out {file}: exists and is a file"]),
    "experiment --preset": (["experiment", "persona", "--preset", "bogus"], ["unknown preset 'bogus'"]),
    "experiment --set key": (["experiment", "persona", "--set", "bogus=1"], ["unknown key 'bogus'"]),
    "delta --lr": (["delta", "--lr", "-1", "--out", "{tmp}/o"], ["--lr must be a finite number > 0, got -1.0"]),
    "delta --params": (["delta", "--params", "last:x", "--out", "{tmp}/o"], ["--params", "'last:x'"]),
    "delta --train": (["delta", "--train", "{tmp}/no.jsonl", "--out", "{tmp}/o"], ["--train {tmp}/no.jsonl: no such"]),
    "delta --unseen": (["delta", "--unseen", "{tmp}", "--out", "{tmp}/o"], ["--unseen {tmp}: is a directory"]),
    "delta --model": (["delta", "--model", "{tmp}/nomodel", "--out", "{tmp}/o"], ["--model {tmp}/nomodel: no such"]),
    "rho --beta": (["rho", "--beta", "0", "--out", "{tmp}/o"], ["--beta must be a finite number > 0"]),
    "rho --unseen": (["rho", "--unseen", "{tmp}/no.jsonl", "--out", "{tmp}/o"], ["--unseen {tmp}/no.jsonl: no such"]),
    "check-step --lrs": (["check-step", "--lrs", "1e-3,-1", "--out", "{tmp}/o"], ["every value of --lrs"]),
    "check-step --chunk-size": (["check-step", "--chunk-size", "0", "--out", "{tmp}/o"], ["--chunk-size must be ≥ 1"]),
    "demo --lr": (["demo", "--lr", "0", "--out", "{tmp}/o"], ["--lr must be a finite number > 0"]),
    "demo --model": (["demo", "--model", "{tmp}/nomodel", "--out", "{tmp}/o"], ["--model {tmp}/nomodel: no such"]),
    "footnote3 --chunk": (["footnote3", "--chunk", "0", "--out", "{tmp}/o"], ["--chunk must be >= 1"]),
    "footnote3 --model": (["footnote3", "--model", "{tmp}/nomodel", "--out", "{tmp}/o"], ["no such model"]),
    "figures missing run": (["figures", "{tmp}/norun", "--out", "{tmp}/figs"], ["{tmp}/norun: no such directory"]),
    # (d) an unknown Persona trait lists the traits (the *.jsonl files), not README.md or LICENSE
    "experiment trait": (
        ["experiment", "persona", "--set", "trait=bogus", "--out", "{tmp}/e"],
        ["trait 'bogus'", "traits: agreeableness, extraversion, openness"],
    ),
    "attribute --project": (
        ["attribute", "--train", "{good}", "--eval", "{good}", "--project", "0", "--out", "{tmp}/o"],
        ["--project must be ≥ 1"],
    ),
    "attribute --eval": (
        ["attribute", "--train", "{good}", "--eval", "{tmp}/no.jsonl", "--out", "{tmp}/o"],
        ["--eval {tmp}/no.jsonl: no such file"],
    ),
    "attribute eval field": (
        ["attribute", "--train", "{good}", "--eval", "{evalbad}", "--out", "{tmp}/o"],
        ["{evalbad} line 2: ", "'rejected'"],
    ),
    "attribute eval empty response": (
        ["attribute", "--train", "{good}", "--eval", "{evalempty}", "--out", "{tmp}/o"],
        ["{evalempty} line 1: field 'response' is empty"],
    ),
    "attribute N = 0": (
        ["attribute", "--train", "{emptyfile}", "--eval", "{good}", "--out", "{tmp}/o"],
        ["{emptyfile}", "no rows"],
    ),
    "attribute --params": (
        ["attribute", "--train", "{good}", "--eval", "{good}", "--params", "last:0", "--out", "{tmp}/o"],
        ["--params", "'last:0'"],
    ),
    "attribute --bundled with --train": (
        ["attribute", "--bundled", "persona", "--train", "{good}", "--out", "{tmp}/o"],
        ["--bundled replaces --train and --eval"],
    ),
    "delta --objective unknown": (
        ["delta", "--objective", "orpo", "--out", "{tmp}/o"],
        ["unknown objective 'orpo'; expected one of dpo, cdpo, ipo, hinge, simpo"],
    ),
    "delta --gamma negative": (
        ["delta", "--objective", "simpo", "--gamma", "-1", "--out", "{tmp}/o"],
        ["--objective / --gamma / --label-smoothing", "γ must be ≥ 0, got -1.0"],
    ),
    "check-step --gamma without simpo": (
        ["check-step", "--gamma", "0.5", "--out", "{tmp}/o"],
        ["objective dpo has no target margin γ (only simpo does)"],
    ),
    "attribute --label-smoothing": (
        ["attribute", "--bundled", "persona", "--objective", "cdpo", "--label-smoothing", "0.7", "--out", "{tmp}/o"],
        ["label smoothing ε must be in [0, 0.5), got 0.7"],
    ),
    "displacement --lr": (["displacement", "--lr", "0", "--out", "{tmp}/o"], ["--lr must be a finite number > 0"]),
    "displacement --params head": (
        ["displacement", "--params", "head", "--out", "{tmp}/o"],
        ["--params", "the IM-RM has no head"],
    ),
    "displacement --train": (
        ["displacement", "--train", "{tmp}/no.jsonl", "--out", "{tmp}/o"],
        ["--train {tmp}/no.jsonl: no such file"],
    ),
    "displacement --run": (
        ["displacement", "--run", "{empty}", "--out", "{tmp}/o"],
        ["--run {empty}: not a run directory of rmdyn's trainer (no config.json)"],
    ),
    "displacement --run --lr": (
        ["displacement", "--run", "{empty}", "--lr", "1e-3", "--out", "{tmp}/o"],
        ["--run takes η, the optimizer and the trained parameters from {empty}/config.json", "drop --lr"],
    ),
    "evaluate --data": (
        ["evaluate", "--data", "{tmp}/no.jsonl", "--out", "{tmp}/o"],
        ["--data {tmp}/no.jsonl: no such file"],
    ),
    "evaluate bad row": (
        ["evaluate", "--data", "{evalbad}", "--out", "{tmp}/o"],
        ["{evalbad}", "line 2"],
    ),
    "evaluate --chunk-size": (
        ["evaluate", "--data", "{good}", "--chunk-size", "0", "--out", "{tmp}/o"],
        ["--chunk-size must be ≥ 1, got 0"],
    ),
    "footnote3 trait": (
        ["footnote3", "--set", "trait=bogus", "--out", "{tmp}/o"],
        ["traits: agreeableness, extraversion, openness"],
    ),
}


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_checks")
    (tmp / "afile").write_text("not a directory\n")
    (tmp / "empty").mkdir()
    (tmp / "taken" / "reward=im").mkdir(parents=True)
    (tmp / "taken" / "reward=im" / "config.json").write_text("{}\n")
    (tmp / "occupied" / "theorem2.json").mkdir(parents=True)
    row = '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
    (tmp / "good.jsonl").write_text(row)
    (tmp / "evalbad.jsonl").write_text(row + '{"prompt": "p", "chosen": "a"}\n')
    (tmp / "evalempty.jsonl").write_text('{"prompt": "p", "response": " "}\n')
    (tmp / "emptyfile.jsonl").write_text("")
    names = {k: str(tmp / f"{k}.jsonl") for k in ("good", "evalbad", "evalempty", "emptyfile")}
    return {"tmp": str(tmp), "file": str(tmp / "afile"), "taken": str(tmp / "taken"), "empty": str(tmp / "empty"),
            **names}  # fmt: skip


def _fill(text: str, places: dict[str, str]) -> str:
    for key, value in places.items():
        text = text.replace("{" + key + "}", value)
    return text


@pytest.fixture(scope="module")
def rejections(places):
    """Every case of CASES run by `cli.main` in one fresh interpreter: {case: {rc, err, jax}}."""
    cases = {name: [_fill(a, places) for a in argv] for name, (argv, _) in CASES.items()}
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(cases)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("case", list(CASES))
def test_rejected_early_with_exit_2_and_without_jax(case, rejections, places):
    result = rejections[case]
    command = CASES[case][0][0]
    assert result["rc"] == 2, result["err"]
    assert result["err"].startswith(f"rmdyn {command}: error: "), result["err"]
    assert "Traceback" not in result["err"]
    for text in CASES[case][1]:
        assert _fill(text, places) in result["err"]
    assert "LICENSE" not in result["err"] and "README" not in result["err"]
    assert not result["jax"], f"{case}: jax was imported before the rejection"
    assert not Path(places["tmp"], "o").exists() and not Path(places["tmp"], "nothere").exists()


def test_every_sub_command_has_a_rejection_case():
    commands = {argv[0] for argv, _ in CASES.values()}
    assert commands >= {name.replace("_", "-") for name in cli.COMMAND_MODULES}


def test_output_checks_are_pure_python():
    code = (
        "import sys; from experiments.cli import preflight; "
        "preflight.check_output_dir('runs/x', files=['a.json']); "
        "assert not any(m in sys.modules for m in ('jax', 'numpy')), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ----------------------------------------------------------------------------------------------------------
# (d) theorem2's flags and defaults; collapsed grids
# ----------------------------------------------------------------------------------------------------------


def test_theorem2_help_shows_every_default():
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices["theorem2"]
    text = sub.format_help()
    for action in sub._actions:
        if action.dest == "help":
            continue
        assert f"(default: {action.default})" in text, action.option_strings


def test_collapsed_grid_runs_are_named_after_their_point():
    assert [r.name for r in load_plan("persona", "cpu", ["reward=im"]).runs()] == ["reward=im"]
    assert [r.name for r in load_plan("persona", "cpu", ['options.reward=["ex"]']).runs()] == ["reward=ex"]
    two = load_plan("persona", "paper", ["reward=im", 'options.model=["/m/pythia-1b"]']).runs()
    assert [r.name for r in two] == ["model=pythia-1b,reward=im"]
    assert [r.name for r in load_plan("persona", "cpu").runs()] == ["reward=im", "reward=ex"]  # unchanged


def _fake_runs(monkeypatch, record):
    """The Persona runner's run and dynamics.loading.load replaced by stubs that record the run directories."""

    def fake_load(source, dtype="float32", progress=False):
        return types.SimpleNamespace(name=f"stub {source}")

    def fake_run(values, run_dir, *, resume=False, progress=True, loaded=None):
        record.append(Path(run_dir))
        final = {"original/train/rewards/accuracies": 1.0}
        return types.SimpleNamespace(final_eval=final, steps=1, timing={"total_s": 0.0}, run_dir=str(run_dir))

    monkeypatch.setattr("dynamics.loading.load", fake_load)
    monkeypatch.setattr("experiments.studies.persona.runner.run", fake_run)


def test_collapsed_grid_writes_a_named_run_directory(tmp_path, monkeypatch, capsys):
    record: list[Path] = []
    _fake_runs(monkeypatch, record)
    out = tmp_path / "out"
    assert cli.main(["experiment", "persona", "--set", "reward=im", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert record == [out / "reward=im"]
    results = json.loads((out / "results.json").read_text())
    assert list(results["runs"]) == ["reward=im"] and results["table"]["columns"] == ["IM-RM"]
    # (e) the model load is announced on stderr; stdout keeps the plan and the table
    assert "loading model default (float32) …" in captured.err and "loaded stub default in" in captured.err
    assert "loading model" not in captured.out and "  reward=im" in captured.out


def test_resume_continues_when_a_run_is_there(tmp_path, monkeypatch, capsys):
    record: list[Path] = []
    _fake_runs(monkeypatch, record)
    out = tmp_path / "out"
    (out / "reward=im").mkdir(parents=True)
    (out / "reward=im" / "config.json").write_text("{}\n")
    assert cli.main(["experiment", "persona", "--resume", "--out", str(out)]) == 0, capsys.readouterr().err
    assert record == [out / "reward=im", out / "reward=ex"]


# ----------------------------------------------------------------------------------------------------------
# (e) progress on stderr
# ----------------------------------------------------------------------------------------------------------


def test_theorem2_announces_its_stages_on_stderr(tmp_path, capsys):
    code = cli.main(["theorem2", "--seeds", "1", "--steps", "2", "--grid", "2", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for text in ("theorem2: source synthetic, 1 seeds", "u* in", "compiling the simulator", "compiled in", "ran in"):
        assert text in captured.err
    assert "theorem2:" not in captured.out and "compiling" not in captured.out
    assert "Theorem 2 simulation" in captured.out and (tmp_path / "theorem2.json").is_file()


@pytest.mark.slow
def test_theorem2_stages_give_the_numbers_of_the_plain_call():
    """The compiled-ahead path that reports the stages equals the plain jitted call (two compilations)."""
    import numpy as np

    from theory.theorem2 import Theorem2Config, simulate_theorem2, synthetic_problems

    problem, config = synthetic_problems(0, 2), Theorem2Config(n_steps=50, n_grid=4)
    lines: list[str] = []
    staged = simulate_theorem2(problem, config, progress=lines.append)
    plain = simulate_theorem2(problem, config, u_star=staged.u_star)
    assert [line.split(" ")[0] for line in lines] == ["compiling", "compiled", "ran"]
    for name in ("cos_u_star", "acc_unseen_ex", "acc_unseen_im", "log_loss_ex", "log_loss_im"):
        np.testing.assert_array_equal(getattr(staged, name), getattr(plain, name))


def test_training_shows_its_stages_before_the_first_step(capsys, monkeypatch):
    import jax
    import numpy as np

    from dynamics.models import LM, DecoderConfig
    from dynamics.text import PairBatch, PreferenceBatch
    from dynamics.training import EvalSuite, TrainConfig, train

    config = DecoderConfig(family="llama", vocab_size=32, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1,
                           head_dim=4, d_ff=16, tie_embeddings=True)  # fmt: skip
    lm = LM(config)
    params = lm.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)

    def side():
        tokens = rng.integers(3, 32, (4, 8)).astype(np.int32)
        response = np.zeros((4, 8), np.int32)
        response[:, 5:] = 1
        return PairBatch(tokens, np.ones((4, 8), np.int32), response)

    data = PreferenceBatch(side(), side())
    suite = EvalSuite.from_preferences({"train": data})
    options = {"reward": "im", "params": "last:1", "max_steps": 1, "batch_size": 4, "micro_batch_size": 4}

    class FirstStep(Exception):
        pass

    def first_step(*args, **kwargs):  # stop where the first optimizer step would start (its compilation is slow)
        raise FirstStep

    monkeypatch.setattr("dynamics.training.engine.accumulate_gradients", first_step)
    with pytest.raises(FirstStep):
        train(TrainConfig(**options), lm, params, data, suite, progress=True)
    err = capsys.readouterr().err
    for text in ("caching frozen blocks 0-0", "reference log-probs", "initial evaluation", "train"):
        assert text in err, err
