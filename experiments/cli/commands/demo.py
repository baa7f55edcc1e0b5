"""`rmdyn demo`: why an IM-RM generalizes differently from an EX-RM, in one step, on the default model.

A Persona training triple (an agreeableness prompt; y+ = "A truthful reply is yes", y− = "Considering the
statement, I say no") and unseen pairs: the paper's paraphrases ("My response would be certainly/absolutely",
"I lean toward not really/nope"), the training-style responses with other answer words, and the paraphrases with
their openings swapped, on the training prompt and on two test prompts. For each: the predicted Δr after one SGD
step on the triple, EX-RM beside IM-RM, with all parameters trained (eNTK) and under Assumption 1 (closed forms,
Eqs. (4) and (5)), and the ρ heatmap of one paraphrase with and without the template's closing tokens. Prints a
table and what the numbers show on this model (which may differ from the paper's 1B+ models).

Writes delta.json, delta_bars.png, rho.png/.json and rho_content_tokens.png/.json under --out (default
./rmdyn-demo). About 4–6 minutes on 2 CPU cores, most of it compilation.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from experiments.cli import arguments, inputs

__all__ = ["DEMO_FILES", "register", "run", "table"]

#: the files `run_demo` writes under --out
DEMO_FILES = ("delta.json", "delta_bars.png", "delta_bars.json", "rho.png", "rho.json", "rho_content_tokens.png",
              "rho_content_tokens.json")  # fmt: skip


def register(subparsers: Any) -> None:
    """Adds the `demo` sub-command (no heavy imports here)."""
    parser = subparsers.add_parser(
        "demo",
        help="the paper's point in one step on SmolLM2: EX-RM vs IM-RM Δr on paraphrases, and ρ (PNG + JSON)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--lr", type=float, default=arguments.DEFAULT_LR,
                        help=f"learning rate η (default {arguments.DEFAULT_LR:g})")  # fmt: skip
    parser.add_argument("--chunk-size", type=int, default=8, help="unseen pairs per JVP batch (default 8)")
    parser.add_argument("--no-closed-form", action="store_true", help="skip the Assumption-1 closed forms")
    arguments.add_model_arguments(parser, ref=False)
    parser.add_argument("--out", default="rmdyn-demo", help="output directory (default ./rmdyn-demo)")
    parser.set_defaults(func=run)


def table(results: dict[str, Any], pairs: list[Any]) -> list[str]:
    """Δr per pair: EX-RM and IM-RM, all parameters (ntk) and, if computed, Assumption 1 (closed form)."""
    cols = [k for k in ("EX-RM ntk all", "IM-RM ntk all", "EX-RM closed_form output", "IM-RM closed_form output")
            if k in results]  # fmt: skip
    short = {"EX-RM ntk all": "EX all", "IM-RM ntk all": "IM all",
             "EX-RM closed_form output": "EX head", "IM-RM closed_form output": "IM unemb"}  # fmt: skip
    head = f"{'':>3} {'prompt':<13} {'unseen response':<39} {'want':>4}" + "".join(f" {short[c]:>10}" for c in cols)
    lines = [head]
    for i, p in enumerate(pairs):
        cells = []
        for c in cols:
            d = results[c].delta[i]
            cells.append(f" {d:>9.3g}{' ' if p.expected * d > 0 else '✗'}")
        lines.append(f"{i:>3} {p.prompt_tag:<13} {p.response:<39} {'+' if p.expected > 0 else '−':>4}" + "".join(cells))
    lines.append("  (✗: Δr against the sign a reward model that generalizes the triple's yes > no would give)")
    return lines


def run(args: argparse.Namespace) -> int:
    """Runs the demo and prints the table, the ρ sums and the explanation."""
    from experiments.cli.preflight import check_model_source, check_output_dir

    lr = arguments.check_positive(args.lr, "--lr")
    beta = arguments.check_positive(args.beta, "--beta")
    chunk = arguments.check_chunk_size(args.chunk_size)
    if not args.tiny:
        check_model_source(args.model)
    check_output_dir(args.out, "--out", files=DEMO_FILES)

    from experiments.cli.commands.rho import summary as rho_summary
    from experiments.studies.demo import TRAIN_CHOSEN, TRAIN_REJECTED, explain, run_demo

    t0 = time.perf_counter()
    loaded = inputs.load_model(args)
    print(f"rmdyn demo on {loaded.name} (loaded in {time.perf_counter() - t0:.1f} s); η = {lr:g}, β = {beta:g}")
    out = run_demo(loaded, args.out, lr=lr, beta=beta, seed=args.seed, chunk_size=chunk,
                   closed_form=not args.no_closed_form)  # fmt: skip
    results, pairs = out["results"], out["pairs"]
    ex, im = results["EX-RM ntk all"], results["IM-RM ntk all"]
    print(
        f"\nTraining triple: x = {pairs[0].prompt!r}\n  y+ = {TRAIN_CHOSEN!r}, y− = {TRAIN_REJECTED!r}; "
        f"g = σ(r−−r+): EX-RM {ex.bt_weight[0]:.4f}, IM-RM {im.bt_weight[0]:.4f}\n"
    )
    print("Predicted Δr after one SGD step (EX all / IM all: eNTK, every parameter trains; EX head / IM unemb:")
    print("Assumption 1 closed forms, Eqs. (4), (5)). Units: EX-RM reward units; IM-RM β·nats.")
    print("\n".join(table(results, pairs)))
    print(f"\nρ of ȳ = {out['rho'].meta['unseen_response']!r} on the training prompt (Eq. (5), IM-RM):")
    print("with the template's closing tokens:")
    print("\n".join(rho_summary(out["rho"])))
    print("content tokens only (--exclude-closing):")
    print("\n".join(rho_summary(out["rho_excluded"])))
    print()
    print("\n".join(explain(results, pairs, out["rho"], out["rho_excluded"])))
    print(f"\nwrote {', '.join(out['files'])} ({time.perf_counter() - t0:.0f} s in all)")
    return 0
