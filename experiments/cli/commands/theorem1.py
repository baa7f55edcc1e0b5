"""`rmdyn theorem1`: Theorem 1's verifier construction and its generation bound (docs/math.md §4).

Prints the construction π ∝ π_ref·exp((δ/β)·1[y ∈ C]) on a random instance and on the Hamiltonian-cycle
setting of docs/math.md §6.1 (a uniform π_ref over the 10! vertex orderings of a 10-vertex graph, of which
the 20 orderings of the planted cycle are correct), for β = 0.01 and several margins δ.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

__all__ = ["DEFAULT_DELTAS", "register", "run"]

DEFAULT_DELTAS = "1,0.05,0.01"


def register(subparsers: Any) -> None:
    """Adds the `theorem1` sub-command (no heavy imports here)."""
    parser = subparsers.add_parser(
        "theorem1",
        help="Theorem 1: an IM-RM verifier that barely raises generation (random and Hamiltonian instances)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--beta", type=float, default=0.01, help="β of the IM-RM (default 0.01)")
    parser.add_argument(
        "--deltas", default=DEFAULT_DELTAS, help=f"comma-separated margins δ (default {DEFAULT_DELTAS})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random instance (default 0)")
    parser.add_argument("--prompts", type=int, default=3, help="prompts of the random instance (default 3)")
    parser.add_argument("--responses", type=int, default=8, help="responses per prompt (default 8)")
    parser.add_argument("--vertices", type=int, default=10, help="graph size N of the Hamiltonian case (10)")
    parser.add_argument(
        "--out", default=None, help="directory for theorem1.json with every number (default: print only)"
    )
    parser.set_defaults(func=run)


def _parse_deltas(text: str) -> list[float]:
    from dynamics.errors import ConfigError

    try:
        deltas = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ConfigError(f"--deltas must be comma-separated numbers, got {text!r}") from err
    if not deltas:
        raise ConfigError(f"--deltas is empty: {text!r}")
    return deltas


def _random_instance(n_prompts: int, n_responses: int, seed: int) -> tuple[Any, Any]:
    """Dirichlet(1) reference distributions and a random non-trivial correct set per prompt."""
    import numpy as np

    from dynamics.errors import ConfigError

    if n_prompts < 1 or n_responses < 2:
        raise ConfigError(f"need --prompts >= 1 and --responses >= 2, got {n_prompts}, {n_responses}")
    rng = np.random.default_rng(seed)
    ref = rng.dirichlet(np.ones(n_responses), size=n_prompts)
    correct = np.zeros((n_prompts, n_responses), dtype=bool)
    for i in range(n_prompts):
        k = rng.integers(1, n_responses)
        correct[i, rng.choice(n_responses, size=k, replace=False)] = True
    return ref, correct


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def run(args: argparse.Namespace) -> int:
    """Prints both instances; writes theorem1.json under --out if given."""
    from dynamics.errors import ConfigError

    deltas = _parse_deltas(args.deltas)
    beta = args.beta
    if not (math.isfinite(beta) and beta > 0):
        raise ConfigError(f"--beta must be a finite number > 0, got {beta}")
    if not all(math.isfinite(d) and d > 0 for d in deltas):
        raise ConfigError(f"every --deltas value must be a finite number > 0, got {deltas}")
    if args.prompts < 1 or args.responses < 2:
        raise ConfigError(f"need --prompts >= 1 and --responses >= 2, got {args.prompts}, {args.responses}")
    if args.vertices < 3:
        raise ConfigError(f"--vertices must be >= 3 (a Hamiltonian cycle needs 3 vertices), got {args.vertices}")
    if args.out:
        from experiments.cli.preflight import check_output_dir

        check_output_dir(args.out, "--out", files=["theorem1.json"])

    import numpy as np  # the heavy imports (theory imports JAX) once every option is known to be good

    from dynamics.outputs import write_json_atomic
    from theory.theorem1 import construction_from_counts, verifier_construction

    report: dict[str, Any] = {"beta": beta, "deltas": deltas, "random": [], "hamiltonian": []}
    print("Theorem 1 (docs/math.md §4): π(y|x) ∝ π_ref(y|x)·exp((δ/β)·1[y ∈ C(x)]), IM-RM r = β ln π/π_ref")
    print(f"β = {beta}; bound π(C) ≤ e^(δ/β)·π_ref(C); odds ratio = e^(δ/β) exactly; logs are natural\n")

    ref, correct = _random_instance(args.prompts, args.responses, args.seed)
    print(f"Random instance: {args.prompts} prompts × {args.responses} responses, Dirichlet(1) π_ref, seed {args.seed}")
    header = (
        f"{'δ':>6} {'x':>2} {'|C|':>3} {'π_ref(C)':>10} {'π(C)':>10} {'bound':>10} {'margin':>10} {'ln odds ratio':>13}"
    )
    print(header)
    for delta in deltas:
        res = verifier_construction(ref, correct, beta, delta)
        m = res.masses
        for i in range(ref.shape[0]):
            print(
                f"{delta:>6g} {i:>2} {int(res.correct[i].sum()):>3} {_fmt(m.ref_mass[i]):>10} "
                f"{_fmt(m.mass[i]):>10} "
                f"{_fmt(m.bound[i]):>10} {res.margin[i]:>10.6g} {m.log_odds_ratio[i]:>13.6g}"
            )
        report["random"].append(res.to_dict())

    n = args.vertices
    if n < 3:
        raise ConfigError(f"--vertices must be >= 3 (a Hamiltonian cycle needs 3 vertices), got {n}")
    n_total, n_correct = math.factorial(n), 2 * n
    print(
        f"\nHamiltonian cycles (docs/math.md §6.1): N = {n}, uniform π_ref over {n}! = {n_total:,} orderings, "
        f"|C| = {n_correct} (the planted cycle: {n} rotations × 2 directions)"
    )
    enumerate_all = n_total <= 10_000_000
    print(
        f"{'δ':>6} {'δ/β':>6} {'π_ref(C)':>10} {'π(C)':>10} {'1 − π(C)':>10} {'bound':>10} "
        f"{'ln π(C)/π_ref(C)':>16} {'ln odds ratio':>13}" + ("  vector check" if enumerate_all else "")
    )
    for delta in deltas:
        counts = construction_from_counts(n_correct, n_total, beta, delta)
        row = counts.to_dict()
        line = (
            f"{delta:>6g} {delta / beta:>6g} {_fmt(counts.ref_mass[0]):>10} {_fmt(counts.mass[0]):>10} "
            f"{_fmt(math.exp(counts.log_mass_incorrect[0])):>10} {_fmt(counts.bound[0]):>10} "
            f"{counts.log_ratio[0]:>16.6g} {counts.log_odds_ratio[0]:>13.6g}"
        )
        if enumerate_all:
            # The same construction on the explicit response vector (one prompt, n! responses).
            ref_vec = np.full((1, n_total), 1.0 / n_total)
            mask = np.zeros((1, n_total), dtype=bool)
            mask[0, :n_correct] = True
            vec = verifier_construction(ref_vec, mask, beta, delta)
            diff = float(np.max(np.abs(vec.masses.log_mass - counts.log_mass)))
            line += f"  margin {vec.margin[0]:.6g}, |Δ ln π(C)| {diff:.1e}"
            row["vector_margin"] = vec.margin
            row["vector_log_mass"] = vec.masses.log_mass
        print(line)
        report["hamiltonian"].append(row)
    print(
        "\nReading: with δ = 1 (δ/β = 100) the bound e^(δ/β)·π_ref(C) is vacuous (> 1) and π(C) → 1; with a"
        "\nsmall δ the IM-RM still verifies perfectly (margin δ) while the chance of generating a correct"
        "\nordering grows by at most e^(δ/β): about 148x for δ = 0.05 and 2.7x for δ = 0.01 at β = 0.01."
    )
    if args.out:
        path = write_json_atomic(f"{args.out}/theorem1.json", report)
        print(f"wrote {path}")
    return 0
