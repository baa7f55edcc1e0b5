"""β and the objective read from a TRL run's training_args.bin (dynamics.run_settings), against the configs TRL
itself writes (torch.save of DPOConfig / CPOConfig), and the file refused or left inert when it is not one."""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import pytest
from conftest import require

from dynamics.errors import ModelError
from dynamics.run_settings import find_run_settings, read_run_settings


def _saved(tmp_path, config, name="training_args.bin"):
    torch = require("torch")
    path = tmp_path / name
    torch.save(config, str(path))
    return path


@pytest.mark.parametrize(
    ("options", "objective", "smoothing"),
    [
        ({"beta": 0.25}, "dpo", 0.0),
        ({"beta": 0.1, "label_smoothing": 0.2}, "cdpo", 0.2),
        ({"beta": 0.5, "loss_type": ["ipo"]}, "ipo", 0.0),
        ({"beta": 0.3, "loss_type": ["hinge"]}, "hinge", 0.0),
    ],
)
def test_dpo_configs_written_by_trl(tmp_path, options, objective, smoothing):
    trl = require("trl")
    config = trl.DPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True, **options)
    s = read_run_settings(_saved(tmp_path, config))
    assert (s.config_class, s.beta, s.objective, s.label_smoothing) == ("DPOConfig", options["beta"], objective,
                                                                       smoothing)  # fmt: skip
    assert s.note == "" and s.gamma == 0.0


def test_losses_without_an_objective_say_why(tmp_path):
    trl = require("trl")
    mix = trl.DPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True,
                        loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])  # fmt: skip
    s = read_run_settings(_saved(tmp_path, mix))
    assert s.objective is None and "a mix of loss types ['sigmoid', 'sft']" in s.note
    other = trl.DPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True, loss_type=["robust"],
                          label_smoothing=0.1)  # fmt: skip
    s = read_run_settings(_saved(tmp_path, other))
    assert s.objective is None and s.note == "loss type 'robust' with label_smoothing 0.1"


def test_cpo_simpo(tmp_path, monkeypatch):
    """TRL's SimPO is its CPO trainer's loss (trl.experimental.cpo in TRL 1.x)."""
    require("trl")
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.cpo import CPOConfig

    config = CPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True, loss_type="simpo",
                       cpo_alpha=0.0, simpo_gamma=0.7, beta=2.0)  # fmt: skip
    s = read_run_settings(_saved(tmp_path, config))
    assert (s.config_class, s.objective, s.gamma, s.beta) == ("CPOConfig", "simpo", 0.7, 2.0)
    config = CPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True, loss_type="simpo",
                       cpo_alpha=1.0)  # fmt: skip
    assert read_run_settings(_saved(tmp_path, config)).objective is None


def _zip(path, name, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(name, payload)
    return path


def test_bad_files_are_refused_by_name(tmp_path):
    with pytest.raises(ModelError, match=r"nothing/training_args.bin: no such file"):
        read_run_settings(tmp_path / "nothing" / "training_args.bin")
    (tmp_path / "a.bin").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match=r"a.bin: not a zip archive"):
        read_run_settings(tmp_path / "a.bin")
    with pytest.raises(ModelError, match=r"b.bin: a zip archive without data.pkl"):
        read_run_settings(_zip(tmp_path / "b.bin", "x/other.txt", b""))
    with pytest.raises(ModelError, match=r"c.bin: unreadable pickle in x/data.pkl"):
        read_run_settings(_zip(tmp_path / "c.bin", "x/data.pkl", b"\x80\x02garbage"))
    with pytest.raises(ModelError, match=r"d.bin: holds list, not a training-arguments object"):
        read_run_settings(_zip(tmp_path / "d.bin", "x/data.pkl", pickle.dumps([1, 2])))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_nothing_in_the_file_is_executed(tmp_path, monkeypatch):
    """A pickle that would call os.system when unpickled for real is read as an inert record."""
    monkeypatch.chdir(tmp_path)
    buf = io.BytesIO()
    pickle.dump({"evil": _Evil()}, buf, protocol=2)
    with pytest.raises(ModelError, match="holds dict"):
        read_run_settings(_zip(tmp_path / "e.bin", "x/data.pkl", buf.getvalue()))
    assert not (tmp_path / "pwned").exists()


def test_find_takes_the_first_directory_that_has_one(tmp_path):
    trl = require("trl")
    a, b = tmp_path / "adapter", tmp_path / "model"
    a.mkdir(), b.mkdir()
    _saved(b, trl.DPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True, beta=0.7))
    assert find_run_settings(None, str(a), str(b)).beta == 0.7
    assert find_run_settings(str(a), str(tmp_path / "model.gguf")) is None


def test_commands_take_beta_from_the_run_and_report_overrides(tmp_path, capsys):
    """`rmdyn evaluate` on a model directory holding a training_args.bin: β and the objective from it, a flag that
    differs reported, a damaged file refused by name before any model work, --reward ex refused without a head."""
    import json
    import shutil

    from _tiny_hf import tiny_hf_dir

    from experiments import cli

    trl = require("trl")
    model = tiny_hf_dir(tmp_path / "model")
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Is the sky blue?", "chosen": "Yes.", "rejected": "No."}) + "\n")
    config = trl.DPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True, beta=0.25,
                           loss_type=["ipo"])  # fmt: skip
    _saved(model, config)
    argv = ["evaluate", "--data", data, "--model", model, "--ref", model]

    def run(*extra):
        code = cli.main([str(a) for a in [*argv, *extra]])
        return code, capsys.readouterr()

    code, io_ = run("--out", tmp_path / "a")
    assert code == 0 and "(DPOConfig): β = 0.25, objective ipo" in io_.out
    saved = json.loads((tmp_path / "a" / "evaluation.json").read_text())
    assert saved["options"]["beta"] == 0.25 and saved["options"]["objective"] == "ipo"
    assert saved["results"]["IM-RM"]["metrics"]["rewards/margins"] == 0.0  # π_θ = π_ref: every reward 0
    code, io_ = run("--beta", "0.5", "--objective", "dpo", "--out", tmp_path / "b")
    assert code == 0 and "note: --beta 0.5 overrides the run's β = 0.25" in io_.out
    assert "note: --objective dpo overrides the run's ipo" in io_.out
    code, io_ = run("--reward", "ex", "--out", tmp_path / "c")
    assert code == 2 and "has no score head" in io_.err
    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    (bad / "training_args.bin").write_bytes(b"junk")
    code, io_ = run("--model", bad, "--out", tmp_path / "d")
    assert code == 2 and f"{bad / 'training_args.bin'}: not a zip archive" in io_.err
