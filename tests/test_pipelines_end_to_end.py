"""The three study pipelines (`rmdyn experiment persona | hamiltonian | ultrafeedback`) end to end on a tiny model.

Each runs through the command line on the tiny random Llama of `_tiny_hf` (`--set model=DIR`), a few steps on a
handful of rows; the tests recompute what the runs report by other means: the Persona accuracies from the final
checkpoints and hidden states computed here, the IM-RM's ties at π = π_ref, the UltraFeedback win / tie / loss
from the accuracies by the standard-error rule written out, generated cycles by brute force. `rmdyn figures` then
reads these real run directories. A run killed with SIGKILL and resumed ends byte for byte as the uninterrupted one.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _tiny_hf import hidden_states, tiny_hf_dir

from experiments import cli

# A few steps on a handful of rows, every set padded to 128 tokens (responses to 64): Persona and UltraFeedback share
# their compiled functions.
SMALL = ["batch_size=4", "micro_batch_size=4", "params=output", "eval_batch_size=8", "bucket=64", "bucket_pad=128"]
PERSONA = ["n_train=8", "n_test=4", "epochs=2", "lr=0.05", "checkpoint_every_steps=1", *SMALL]
HAMILTONIAN = ["reward=im", "n_train=8", "n_test=4", "n_train_eval=4", "max_steps=2", "gen_n_train=2", "gen_n_test=2",
               "gen_max_new_tokens=8", *SMALL]  # fmt: skip
UF_SETS = {"ultrafeedback": "in-distribution", "paraphrase": "token-level shift", "french": "token-level shift",
           "rewardbench_code": "domain shift"}  # fmt: skip
ULTRAFEEDBACK = ["n_train=8", "n_eval=4", "n_train_eval=4", "max_steps=2", "max_response_tokens=32", "max_length=128",
                 "truncate=true", "eval_sets=" + json.dumps(list(UF_SETS)),
                 "categories=" + json.dumps([f"{k}={v}" for k, v in UF_SETS.items()]), *SMALL]  # fmt: skip


def _argv(name: str, tiny_dir: Path, overrides: list[str], out: Path, *extra: str) -> list[str]:
    sets = [a for item in [f"model={tiny_dir}", *overrides] for a in ("--set", item)]
    return ["experiment", name, *sets, "--out", str(out), "--no-progress", *extra]


def _experiment(name: str, tiny_dir: Path, overrides: list[str], out: Path) -> Path:
    code = cli.main(_argv(name, tiny_dir, overrides, out))
    assert code == 0
    return out


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_hf_dir(tmp_path_factory.getbasetemp() / "tiny-hf")


@pytest.fixture(scope="module")
def persona_out(tiny_dir, tmp_path_factory) -> Path:
    return _experiment("persona", tiny_dir, PERSONA, tmp_path_factory.mktemp("persona") / "out")


@pytest.fixture(scope="module")
def hamiltonian_out(tiny_dir, tmp_path_factory) -> Path:
    return _experiment("hamiltonian", tiny_dir, HAMILTONIAN, tmp_path_factory.mktemp("hamiltonian") / "out")


@pytest.fixture(scope="module")
def ultrafeedback_out(tiny_dir, tmp_path_factory) -> Path:
    return _experiment("ultrafeedback", tiny_dir, ULTRAFEEDBACK, tmp_path_factory.mktemp("uf") / "out")


def _runs(out: Path) -> dict[str, Path]:
    """Run name → run directory, as results.json lists them; each run's summary agrees with results.json."""
    results = _json(out / "results.json")
    runs = {name: out / name for name in results["runs"]}
    for name, run_dir in runs.items():
        assert _json(run_dir / "summary.json")["final_eval"] == results["final_eval"][name]
    return runs


def _evals(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "eval"]


def _assert_ties_at_the_start(run_dir: Path) -> None:
    """An IM-RM at step 0 has π = π_ref: every reward is 0, every pair a tie, accuracy exactly ½."""
    first = _evals(run_dir)[0]
    assert first["step"] == 0
    ties = [k for k in first if k.endswith("/rewards/ties")]
    assert ties and all(first[k] == 1.0 for k in ties)
    assert all(first[k] == 0.5 for k in first if k.endswith("/rewards/accuracies"))


# ----------------------------------------------------------------------------------------------------------
# Persona
# ----------------------------------------------------------------------------------------------------------


def test_persona_accuracies_recomputed_from_the_checkpoints(persona_out, tiny_dir):
    """Every accuracy of the Persona table, recomputed from the final parameters (the EX-RM's head u, the IM-RM's
    untied unembedding W) and hidden states of the frozen blocks computed here."""
    from safetensors.numpy import load_file

    from dynamics.loading import load
    from dynamics.text import encode_pairs
    from experiments.plans.grammar import load_plan
    from experiments.studies.persona.data import persona_texts

    runs = _runs(persona_out)
    assert set(runs) == {"reward=im", "reward=ex"}
    _assert_ties_at_the_start(runs["reward=im"])
    loaded = load(str(tiny_dir))
    texts = persona_texts(dict(load_plan("persona", "cpu", [f"model={tiny_dir}", *PERSONA]).values))
    sets: dict[str, tuple[list[str], list[str]]] = {}
    for split, rows in (("train", texts.train), ("test", texts.test)):
        prompts = [r["prompt"] for r in rows]
        for side in ("chosen", "rejected"):
            sets[f"{split}/original/{side}"] = (prompts, [r[side] for r in rows])
        for side, words in (("yes", texts.eval_words_yes), ("no", texts.eval_words_no)):
            for word in words:
                sets[f"{split}/{side}/{word}"] = (prompts, [p + word for p in texts.eval_prefixes[split][side]])
    prompts = [p for ps, _ in sets.values() for p in ps]
    responses = [r for _, rs in sets.values() for r in rs]
    hidden, ids = hidden_states(loaded, prompts, responses)
    response = np.asarray(encode_pairs(loaded.tokenizer, prompts, responses, max_length=512).response_mask)
    W0 = np.asarray(loaded.params["embed"]["embedding"], np.float64)

    def log_pi(W):  # ln π(y|x) of every sequence, summed over its response tokens
        out = np.zeros(len(ids))
        for i, row in enumerate(ids):
            t = np.flatnonzero(response[i])
            logits = hidden[i, t - 1] @ W.T
            top = logits.max(1, keepdims=True)
            lse = top[:, 0] + np.log(np.exp(logits - top).sum(1))
            out[i] = np.sum(logits[np.arange(len(t)), np.asarray(row)[t]] - lse)
        return out

    for name, run_dir in runs.items():
        step = _json(run_dir / "checkpoints" / "latest.json")["checkpoint"]
        state = load_file(str(run_dir / "checkpoints" / step / "state.safetensors"))
        if name == "reward=ex":
            u = np.asarray(state["params/head/u"], np.float64)
            rewards = hidden[np.arange(len(ids)), [len(r) - 1 for r in ids]] @ u
        else:
            W1 = np.asarray(state["params/lm/lm_head/w"], np.float64)
            rewards = 0.01 * (log_pi(W1) - log_pi(W0))
        starts = np.cumsum([0] + [len(ps) for ps, _ in sets.values()])
        r = {key: rewards[a:b] for key, a, b in zip(sets, starts[:-1], starts[1:], strict=True)}

        def accuracy(chosen, rejected):
            return float(np.mean((chosen > rejected) + 0.5 * (chosen == rejected)))

        final = _json(run_dir / "summary.json")["final_eval"]
        for split in ("train", "test"):
            c, j = r[f"{split}/original/chosen"], r[f"{split}/original/rejected"]
            assert final[f"original/{split}/rewards/accuracies"] == accuracy(c, j), (name, split)
            assert final[f"original/{split}/rewards/margins"] == pytest.approx(np.mean(c - j), rel=1e-3, abs=1e-6)
            combos = itertools.product(texts.eval_words_yes, texts.eval_words_no)
            para = np.mean([accuracy(r[f"{split}/yes/{a}"], r[f"{split}/no/{b}"]) for a, b in combos])
            assert final[f"paraphrased/{split}/rewards/accuracies"] == pytest.approx(para, abs=1e-12), (name, split)
    # results.json's table shows the final numbers
    table = _json(persona_out / "results.json")["table"]
    for row in table["rows"]:
        for label, name in (("IM-RM", "reward=im"), ("EX-RM", "reward=ex")):
            key = f"{row['responses'].lower()}/{row['prompts'].lower()}/rewards/accuracies"
            assert row[label] == _json(runs[name] / "summary.json")["final_eval"][key]


def test_persona_dry_run_lists_the_grid_and_writes_nothing(tiny_dir, tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(_argv("persona", tiny_dir, PERSONA, out, "--dry-run")) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert "  reward=im" in lines and "  reward=ex" in lines
    plan = json.loads(text[text.index("\n{") :])
    assert plan["grid"]["reward"] == ["im", "ex"] and plan["values"]["n_train"] == 8
    assert plan["values"]["model"] == str(tiny_dir)
    assert not out.exists()


def test_persona_refuses_an_occupied_out(persona_out, tiny_dir, capsys):
    before = {p: p.stat().st_mtime_ns for p in persona_out.rglob("*") if p.is_file()}
    assert cli.main(_argv("persona", tiny_dir, PERSONA, persona_out)) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and str(persona_out) in err
    assert {p: p.stat().st_mtime_ns for p in persona_out.rglob("*") if p.is_file()} == before


def test_run_records_name_files_relative_to_the_run_directory(persona_out, tiny_dir):
    """config.json names the model directory and the data file relative to its run directory (so a resume from
    another working directory sees the same record), and those names lead back to the files."""
    import os

    from experiments.studies.persona.data import persona_data_file

    for run_dir in _runs(persona_out).values():
        record = _json(run_dir / "config.json")
        source, data_file = record["model"]["source"], record["data"]["info"]["data_file"]
        assert not os.path.isabs(source) and not os.path.isabs(data_file)
        assert (run_dir / source).resolve() == Path(tiny_dir).resolve()
        bundled = persona_data_file({"data_file": "", "trait": record["data"]["info"]["trait"]})
        assert (run_dir / data_file).resolve() == Path(bundled).resolve()


_CHILD = """
import sys, time
import dynamics.training.engine as engine
inner = engine.accumulate_gradients

def slow(*args, **kwargs):  # a slow step, so that the kill lands mid-run
    time.sleep(0.8)
    return inner(*args, **kwargs)

engine.accumulate_gradients = slow
from experiments.cli import main
sys.exit(main({argv!r}))
"""


def test_persona_sigkill_then_resume_ends_as_the_uninterrupted_run(persona_out, tiny_dir, tmp_path):
    """The EX-RM run of `persona_out`, killed with SIGKILL after its first checkpoint, then `--resume`d."""
    cut = tmp_path / "cut"
    argv = _argv("persona", tiny_dir, [*PERSONA, "reward=ex"], cut)
    log = (tmp_path / "child.log").open("w")
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(argv=argv)], stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=str(Path(__file__).parent))  # fmt: skip
    try:
        deadline = time.time() + 300
        while time.time() < deadline and child.poll() is None and not list(cut.glob("*/checkpoints/latest.json")):
            time.sleep(0.05)
        assert child.poll() is None, (
            "the child finished (or failed) before it could be killed: " + (tmp_path / "child.log").read_text()[-2000:]
        )
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
        log.close()
    assert child.returncode == -signal.SIGKILL
    (run_dir,) = [p.parent for p in cut.glob("*/config.json")]
    assert not (run_dir / "summary.json").exists()
    killed_at = _json(run_dir / "checkpoints" / "latest.json")["step"]
    assert cli.main([*argv, "--resume"]) == 0
    whole = persona_out / "reward=ex"
    summary = _json(run_dir / "summary.json")
    assert 1 <= summary["resumed_from_step"] == killed_at < summary["steps"] == 4
    assert (run_dir / "metrics.jsonl").read_bytes() == (whole / "metrics.jsonl").read_bytes()
    assert summary["final_eval"] == _json(whole / "summary.json")["final_eval"]


# ----------------------------------------------------------------------------------------------------------
# Hamiltonian cycles
# ----------------------------------------------------------------------------------------------------------


def _is_hamiltonian_cycle(text: str, n: int, edges: set) -> bool:
    """By hand: n distinct vertices 0..n−1 separated by <sep>, consecutive ones (and last, first) adjacent."""
    parts = text.split("<sep>")
    if len(parts) != n or not all(p.isdigit() for p in parts):
        return False
    order = [int(p) for p in parts]
    if sorted(order) != list(range(n)):
        return False
    return all(frozenset((order[i], order[(i + 1) % n])) in edges for i in range(n))


def test_hamiltonian_pipeline(hamiltonian_out):
    from experiments.plans.grammar import load_plan
    from experiments.studies.hamiltonian.data import hamiltonian_data

    runs = _runs(hamiltonian_out)
    assert len(runs) == 1  # reward=im: the generation test
    (run_dir,) = runs.values()
    _assert_ties_at_the_start(run_dir)
    final = _json(run_dir / "summary.json")["final_eval"]
    generation = _json(run_dir / "generation.json")
    values = dict(load_plan("hamiltonian", "cpu", HAMILTONIAN).values)
    data = hamiltonian_data(values)
    order = list(data.train_eval) + [i for i in range(len(data.train)) if i not in set(data.train_eval)]
    for split, graphs in (("train", [data.train[i] for i in order[:2]]), ("test", data.test[:2])):
        g = generation[split]
        assert g["n"] == len(g["examples"]) == 2
        n_correct = 0
        for graph, example in zip(graphs, g["examples"], strict=True):
            edges = {frozenset(e) for e in graph.edges}
            n = graph.n_vertices
            assert _is_hamiltonian_cycle("<sep>".join(map(str, graph.cycle)), n, edges)  # y+ is one, y− is not
            assert not _is_hamiltonian_cycle("<sep>".join(map(str, graph.not_cycle)), n, edges)
            assert example["correct"] == _is_hamiltonian_cycle(example["text"], n, edges), example
            n_correct += example["correct"]
        assert g["correct"] == n_correct and g["accuracy"] == n_correct / 2
        assert final[f"generation/{split}/accuracy"] == n_correct / 2 and final[f"generation/{split}/n"] == 2.0
    table = _json(hamiltonian_out / "results.json")["table"]
    rows = {row["metric"]: row for row in table["rows"]}
    assert rows["Train accuracy"]["IM-RM"] == final["train/rewards/accuracies"]
    assert rows["Test accuracy"]["IM-RM"] == final["test/rewards/accuracies"]
    assert rows["Correct generations (test prompts)"]["IM-RM"] == final["generation/test/accuracy"]


# ----------------------------------------------------------------------------------------------------------
# UltraFeedback
# ----------------------------------------------------------------------------------------------------------


def test_ultrafeedback_pipeline_win_tie_loss_by_hand(ultrafeedback_out):
    runs = _runs(ultrafeedback_out)
    assert set(runs) == {"reward=im", "reward=ex"}
    _assert_ties_at_the_start(runs["reward=im"])
    final = {name: _json(d / "summary.json")["final_eval"] for name, d in runs.items()}
    table = _json(ultrafeedback_out / "results.json")["table"]
    comparisons = {c["set"]: c for c in table["comparisons"]}
    assert set(comparisons) == set(UF_SETS)
    counts: dict[str, dict[str, int]] = {}
    for name, category in UF_SETS.items():
        a, b = (final[f"reward={k}"][f"{name}/rewards/accuracies"] for k in ("ex", "im"))
        n = final["reward=ex"][f"{name}/rows"]
        assert n == final["reward=im"][f"{name}/rows"] == 4.0
        band = math.sqrt(a * (1 - a) / n + b * (1 - b) / n)  # one standard error of the difference
        winner = "ex" if a - b > band else "im" if b - a > band else "tie"
        c = comparisons[name]
        assert (c["acc_ex"], c["acc_im"], c["category"], c["winner"]) == (a, b, category, winner), c
        assert c["band"] == pytest.approx(band, rel=1e-12)
        key = {"ex": "ex_wins", "im": "im_wins", "tie": "ties"}[winner]
        counts.setdefault(category, {"ex_wins": 0, "ties": 0, "im_wins": 0})[key] += 1
    summary = table["summary"]["EX-RM vs IM-RM"]
    assert {cat: {k: s[k] for k in ("ex_wins", "ties", "im_wins")} for cat, s in summary.items()} == counts
    for cat, s in summary.items():
        sets = [name for name, c in UF_SETS.items() if c == cat]
        assert s["mean_acc_ex"] == pytest.approx(np.mean([final["reward=ex"][f"{x}/rewards/accuracies"] for x in sets]))


# ----------------------------------------------------------------------------------------------------------
# Figures from the real run directories
# ----------------------------------------------------------------------------------------------------------


def test_figures_on_the_real_runs(persona_out, hamiltonian_out, ultrafeedback_out, tmp_path, capsys):
    figs = tmp_path / "figures"
    code = cli.main(["figures", str(persona_out), str(hamiltonian_out), str(ultrafeedback_out), "--out", str(figs)])
    assert code == 0, capsys.readouterr().err
    finals = {
        (exp, name): _json(d / "summary.json")["final_eval"]
        for exp, out in (("persona", persona_out), ("hamiltonian", hamiltonian_out), ("uf", ultrafeedback_out))
        for name, d in _runs(out).items()
    }
    persona = _json(figs / "persona_table.json")
    for row in persona["rows"]:
        responses, prompts = (s.strip().lower() for s in row["responses / prompts"].split("/"))
        key = f"{responses}/{prompts}/rewards/accuracies"
        assert row["EX-RM"] == finals["persona", "reward=ex"][key]
        assert row["IM-RM"] == finals["persona", "reward=im"][key]
    ham = {row["metric"]: row for row in _json(figs / "hamiltonian_table.json")["rows"]}
    final = finals["hamiltonian", "reward=im"]
    assert ham["Train accuracy"]["IM-RM"] == final["train/rewards/accuracies"]
    assert ham["Test accuracy"]["IM-RM"] == final["test/rewards/accuracies"]
    assert ham["Correct generations (train prompts)"]["IM-RM"] == final["generation/train/accuracy"]
    aggregate = {row["category"]: row for row in _json(figs / "ultrafeedback_aggregate.json")["rows"]}
    for category in set(UF_SETS.values()):
        sets = [name for name, c in UF_SETS.items() if c == category]
        for kind, label in (("ex", "EX-RM"), ("im", "IM-RM")):
            f = finals["uf", f"reward={kind}"]
            assert aggregate[category][f"{label} acc"] == pytest.approx(
                np.mean([f[f"{s}/rewards/accuracies"] for s in sets]), abs=1e-12
            )
            assert aggregate[category][f"{label} margin"] == pytest.approx(
                np.mean([f[f"{s}/rewards/normalized_margin"] for s in sets]), rel=1e-12
            )
    index = (figs / "index.md").read_text()
    assert "persona_table" in index and "hamiltonian_table" in index and "ultrafeedback_aggregate" in index


def test_persona_controlled_preset(tiny_dir, tmp_path):
    """`rmdyn experiment persona --preset controlled` on the tiny model, 2 seeds, on a user's own trait file and word
    lists given with --set: every run's controlled.json, whose per-prompt cell accuracies average to the cells the
    evaluator logged, and the report with its forest plot."""
    trait = tmp_path / "my_trait.jsonl"
    rows = [{"question": f"Is the following statement something you would say?\n\"I like puzzle number {i}\"",
             "statement": f"I like puzzle number {i}", "answer_matching_behavior": " Yes",
             "answer_not_matching_behavior": " No"} for i in range(12)]  # fmt: skip
    trait.write_text("".join(json.dumps(r) + "\n" for r in rows))
    small = ['new_openings=["Here is my answer: "]', 'new_words_yes=[["indeed"]]', 'new_words_no=[["hardly"]]']
    overrides = [*PERSONA, f"data_file={trait}", "controlled_train_prompts=4", "epochs=1", "options.seed=[0,1]", *small]
    out = tmp_path / "controlled"
    assert cli.main(_argv("persona", tiny_dir, overrides, out, "--preset", "controlled")) == 0
    finals = _json(out / "results.json")["final_eval"]
    assert sorted(finals) == ["reward=ex,seed=0", "reward=ex,seed=1", "reward=im,seed=0", "reward=im,seed=1"]
    for name, final in finals.items():
        cells = _json(out / name / "controlled.json")["cells"]
        assert len(cells) == 2 * (2 * 2 + 2 + 2)  # splits × (opening kinds × word lists + opening cells + paper's 2)
        for cell, per_prompt in cells.items():
            logged = cell if not cell.startswith("paper/") else "{2}/{1}".format(*cell.split("/"))
            assert all(0.0 <= v <= 1.0 for v in per_prompt)
            assert len(per_prompt) == (8 if cell.startswith("paper/train") else 4)  # all 8 training prompts
            assert np.mean(per_prompt) == pytest.approx(final[f"{logged}/rewards/accuracies"], abs=1e-12), (name, cell)
        record = _json(out / name / "config.json")
        assert record["train"]["head_seed"] == record["train"]["seed"]  # head_seed = -1 follows the seed
        assert (out / name / record["data"]["info"]["data_file"]).resolve() == trait.resolve()
    report = _json(out / "controlled_report.json")
    (group,) = report["groups"].values()
    assert group["seeds"] == {"IM-RM": [0, 1], "EX-RM": [0, 1]} and "EX-RM − IM-RM" in group["cells"]["test/new words"]
    assert (out / "controlled_forest.png").stat().st_size > 10_000 and (out / "controlled_report.md").is_file()
