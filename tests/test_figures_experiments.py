"""`rmdyn figures` on small synthetic run directories: every table and figure they support is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dynamics.errors import DataError

UF_SETS = ("ultrafeedback", "paraphrase", "french", "spanish", "rewardbench_math", "rewardbench_code", "rewardmath")
UF_CATEGORIES = {"ultrafeedback": "in-distribution", "paraphrase": "token-level shift", "french": "token-level shift",
                 "spanish": "token-level shift", "rewardbench_math": "domain shift",
                 "rewardbench_code": "domain shift", "rewardmath": "domain shift"}  # fmt: skip


def _metrics(name: str, acc: float, margin: float = 1.0) -> dict[str, float]:
    return {f"{name}/rewards/accuracies": acc, f"{name}/rewards/normalized_margin": margin}


def write_run(root: Path, experiment: str, kind: str, evals: list[dict], info: dict | None = None,
              model: str = "tiny", extra: dict | None = None, finished: bool = True) -> Path:  # fmt: skip
    """A run directory as dynamics.training writes it (the fields rmdyn figures reads)."""
    root.mkdir(parents=True)
    config = {"reward_model": {"kind": kind}, "model": {"name": model},
              "data": {"info": {"experiment": experiment, **(info or {})}}}  # fmt: skip
    (root / "config.json").write_text(json.dumps(config))
    lines = [{"event": "train", "step": 1, "epoch": 1.0, "loss": 0.5}]
    lines += [{"event": "eval", "step": k, "epoch": float(k), **e} for k, e in enumerate(evals)]
    (root / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if finished:
        (root / "summary.json").write_text(json.dumps({"final_eval": {**evals[-1], **(extra or {})}}))
    return root


def persona_eval(orig: float, para: float) -> dict[str, float]:
    out = {}
    for split in ("train", "test"):
        out.update(_metrics(f"original/{split}", orig))
        out.update(_metrics(f"paraphrased/{split}", para))
    return out


def uf_eval(accs: dict[str, float], rows: int = 16) -> dict[str, float]:
    out = _metrics("train", 0.9)
    for name, acc in accs.items():
        out.update(_metrics(name, acc, 0.5 + acc))
        out[f"{name}/rows"] = float(rows)
    return out


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    base = tmp_path / "runs"
    for kind, para in (("ex", 0.9), ("im", 0.1), ("exgrm", 0.8)):
        write_run(base / "persona" / f"reward={kind}", "persona", kind,
                  [persona_eval(0.5, 0.5), persona_eval(0.9, para), persona_eval(1.0, para)])  # fmt: skip
    write_run(base / "persona-running" / "reward=im", "persona", "im", [persona_eval(0.5, 0.5)], finished=False,
              model="other")  # fmt: skip
    ham = {"train/rewards/accuracies": 1.0, "test/rewards/accuracies": 0.9, **_metrics("train", 1.0)}
    write_run(base / "ham" / "reward=im", "hamiltonian", "im", [ham],
              extra={"generation/train/accuracy": 0.0, "generation/test/accuracy": 0.0})  # fmt: skip
    write_run(base / "ham" / "reward=ex", "hamiltonian", "ex", [{**ham, "test/rewards/accuracies": 0.8}])
    tie = {"kind": "stderr", "k": 1.0, "threshold": 0.01, "description": "tie when …"}
    info = {"train_data": "ultrafeedback_original", "categories": UF_CATEGORIES, "tie_rule": tie}
    rng = np.random.default_rng(0)
    for kind in ("ex", "im", "ex-mean", "im-noref"):
        accs = {s: float(rng.integers(0, 17)) / 16 for s in UF_SETS}
        write_run(base / "uf" / f"reward={kind}", "ultrafeedback", kind, [uf_eval(accs), uf_eval(accs)], info)
    rm_info = {
        **info,
        "train_data": "rewardmath",
        "categories": {s: ("in-distribution" if s == "rewardmath" else "domain shift") for s in UF_SETS},
    }
    for kind, acc in (("ex", 0.9), ("im", 0.2)):
        write_run(base / "rm" / f"reward={kind}", "ultrafeedback", kind, [uf_eval(dict.fromkeys(UF_SETS, acc))],
                  rm_info)  # fmt: skip
    stats = {"mean": 0.1, "min": -1.0, "q1": 0.0, "median": 0.1, "q3": 0.2, "max": 1.0, "fraction_positive": 0.6,
             "count": 10}  # fmt: skip
    f3 = {"statistics": {"seen·unseen_train inner": stats, "u*·unseen_test cosine": stats},
          "max_margin": {"separable": True, "norm": 2.0, "geometric_margin": 0.5, "n_support": 3, "solver": "x"},
          "shapes": {"seen": [80, 576]}, "info": {"model": {"name": "tiny"}}}  # fmt: skip
    (base / "f3").mkdir()
    (base / "f3" / "footnote3.json").write_text(json.dumps(f3))
    return base


def test_figures_command_writes_every_supported_output(runs, tmp_path, capsys):
    from experiments import cli

    out = tmp_path / "figs"
    assert cli.main(["figures", str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    expected = [
        "persona_table", "persona_ablations", "hamiltonian_table", "ultrafeedback_aggregate", "ultrafeedback_summary",
        "ultrafeedback_ablations", "rewardmath_aggregate", "rewardmath_summary", "footnote3_table",
    ]  # fmt: skip
    for stem in expected:
        for suffix in (".png", ".json", ".md"):
            assert (out / f"{stem}{suffix}").stat().st_size > 0, stem + suffix
    for stem in ("persona_curves", "hamiltonian_curves", "ultrafeedback_figure2", "ultrafeedback_curves",
                 "rewardmath_figure2", "rewardmath_curves"):  # fmt: skip
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.json").exists(), stem
    assert not (out / "rewardmath_ablations.png").exists()  # only EX-RM and IM-RM were trained on RewardMATH
    assert str(out / "index.md") in printed

    persona = json.loads((out / "persona_table.json").read_text())
    assert persona["columns"] == ["EX-RM", "IM-RM", "paper EX-RM", "paper IM-RM"]
    para_test = persona["rows"][3]
    assert para_test["paper IM-RM"] == 0.019 and para_test["EX-RM"] == 0.9
    assert para_test["IM-RM"] == pytest.approx((0.1 + 0.5) / 2)  # mean over both IM-RM runs (one still running)
    assert "0.019" in (out / "persona_table.md").read_text()
    ablations = json.loads((out / "persona_ablations.json").read_text())
    assert ablations["columns"] == ["EX-RM", "EX-GRM", "IM-RM"]

    ham = (out / "hamiltonian_table.md").read_text()
    assert "Correct generations (test prompts)" in ham and "0.993" in ham
    agg = json.loads((out / "ultrafeedback_aggregate.json").read_text())
    assert [r["category"] for r in agg["rows"]] == ["in-distribution", "token-level shift", "domain shift"]
    assert agg["rows"][0]["paper EX-RM margin"] == 1.014 and "EX-RM (mean) acc" not in agg["columns"]
    assert "EX-RM (mean) acc" in json.loads((out / "ultrafeedback_ablations.json").read_text())["columns"]
    assert "paper EX-RM acc" not in json.loads((out / "rewardmath_aggregate.json").read_text())["columns"]
    fig2 = json.loads((out / "rewardmath_figure2.json").read_text())
    assert {c["winner"] for c in fig2["comparisons"]} == {"ex"} and len(fig2["comparisons"]) == 7
    summary = json.loads((out / "rewardmath_summary.json").read_text())
    assert summary["rows"][0] == {"pair / category": "EX-RM vs IM-RM: in-distribution", "EX wins": 1, "ties": 0,
                                  "IM wins": 0, "sets": 1}  # fmt: skip
    curves = json.loads((out / "persona_curves.json").read_text())
    line = curves["panels"]["paraphrased/test"]["IM-RM · tiny"]
    assert line["x"] == [0.0, 1.0, 2.0] and line["y"] == [0.5, 0.1, 0.1]
    f3 = (out / "footnote3_table.md").read_text()
    assert "u*·unseen_test cosine" in f3 and "geometric margin 0.5" in f3


def test_figures_bad_input(tmp_path):
    from experiments.cli.commands.figures import make_figures

    with pytest.raises(DataError, match="no such directory"):
        make_figures([str(tmp_path / "nope")], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no run directories"):
        make_figures([str(tmp_path / "empty")], tmp_path / "out")
    bad = write_run(tmp_path / "bad", "persona", "ex", [persona_eval(1, 1)])
    (bad / "metrics.jsonl").write_text('{"event": "eval"}\nnot json\n')
    with pytest.raises(DataError, match=r"metrics.jsonl line 2"):
        make_figures([str(bad)], tmp_path / "out")
