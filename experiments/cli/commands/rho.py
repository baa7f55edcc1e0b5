"""`rmdyn rho`: the IM-RM's token-level coefficients ρ_{k,l} for one unseen pair (docs/math.md §3.2, Eq. (5)).

Under Assumption 1 (only the untied unembedding trains) one SGD step on the triple (x, y+, y−) changes the IM-RM
reward of an unseen pair (x̄, ȳ) by η β² g [Σ_k Σ_l ⟨h_{x̄,ȳ<k}, h_{x,y+<l}⟩ ρ_{k,l}(y+) − (same for y−)], with
ρ_{k,l}(v) = 1[ȳ_k = v_l] − π(ȳ_k | x, v<l) − π(v_l | x̄, ȳ<k) + ⟨p, q⟩. Writes rho.png (ρ, ⟨h, h'⟩ and their
product for y+ and y−) and rho.json under --out and prints the double sums and the largest contributions.

The chat template's closing tokens (SmolLM2: `<|im_end|>` and a newline) end every response, so they are always
"matching tokens" with ρ ≥ 0 and dominate the sums (docs/math.md §9); --exclude-closing leaves them out.

Examples:
  rmdyn rho                                    # Persona triple, ȳ = "My response would be certainly"
  rmdyn rho --pair "Is the sky blue?" "Certainly" --prompt "Is grass green?" --chosen "Yes" --rejected "No"
  rmdyn rho --exclude-closing --out runs/rho_content
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from experiments.cli import arguments, inputs
from experiments.studies import one_step

__all__ = ["register", "run", "summary", "top_contributions"]


def register(subparsers: Any) -> None:
    """Adds the `rho` sub-command (no heavy imports here)."""
    parser = subparsers.add_parser(
        "rho",
        help="ρ_{k,l} heatmaps and the Eq. (5) double sums for one unseen pair (IM-RM)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    arguments.add_train_arguments(parser, several=False)
    arguments.add_unseen_arguments(parser, several=False)
    parser.add_argument("--exclude-closing", action="store_true",
                        help="leave the chat template's closing tokens out of both axes")  # fmt: skip
    parser.add_argument("--lr", type=float, default=arguments.DEFAULT_LR,
                        help=f"learning rate η of the closed-form Δr (default {arguments.DEFAULT_LR:g})")  # fmt: skip
    arguments.add_model_arguments(parser, head_seed=False)
    parser.add_argument("--out", default="runs/rho", help="output directory (default runs/rho)")
    parser.set_defaults(func=run)


def top_contributions(panel: Any, unseen: list[str], k: int = 3) -> list[str]:
    """The k cells (ȳ_k, v_l) with the largest |⟨h, h'⟩ ρ|, formatted."""
    import numpy as np

    from figures.rho_heatmap import readable_token

    prod = panel.product
    order = np.argsort(-np.abs(prod), axis=None)[:k]
    out = []
    for flat in order:
        a, b = np.unravel_index(flat, prod.shape)
        out.append(
            f"(ȳ_k = '{readable_token(unseen[a])}', v_l = '{readable_token(panel.train_tokens[b])}'): "
            f"ρ = {panel.rho[a, b]:.3g}, ⟨h,h'⟩ = {panel.hidden_similarity[a, b]:.4g}, product {prod[a, b]:.4g}"
        )
    return out


def summary(result: Any) -> list[str]:
    """The printed sums of a `RhoResult`."""
    lines = []
    for key, v in (("chosen", "y+"), ("rejected", "y−")):
        p = getattr(result, key)
        lines.append(
            f"  {v}: ΣΣ⟨h,h'⟩ρ = {p.kernel_sum:.6g}   (Σρ = {p.rho.sum():.4g}, Σ⟨h,h'⟩ = "
            f"{p.hidden_similarity.sum():.6g}, {p.rho.shape[0]}×{p.rho.shape[1]} token pairs)"
        )
        lines += [f"      {c}" for c in top_contributions(p, result.unseen_tokens)]
    lines.append(
        f"  K(u,y+) = β²ΣΣ = {result.kernel_chosen:.6g},  K(u,y−) = {result.kernel_rejected:.6g},  "
        f"g = {result.bt_weight:.4g}"
    )
    lines.append(
        f"  Δr (Eq. (5), η = {result.lr:g}) = η·g·(K+ − K−) = {result.delta_reward:.6g}"
        f"  → the step {'raises' if result.delta_reward > 0 else 'lowers'} r(ȳ)"
    )
    return lines


def run(args: argparse.Namespace) -> int:
    """Validates the options, runs `rho_analysis`, prints the sums, writes rho.png + rho.json."""
    lr = arguments.check_positive(args.lr, "--lr")
    beta = arguments.check_positive(args.beta, "--beta")
    arguments.check_inputs(args, "rho.png", "rho.json")
    rows, rows_from = inputs.training_rows(args)
    pairs, pairs_from = inputs.unseen_pairs(args, single=True)

    from dynamics.rho import rho_analysis  # JAX: only once every option is known to be good
    from figures.rho_heatmap import rho_figure

    row, pair = rows[0], pairs[0]
    t0 = time.perf_counter()
    loaded = inputs.load_model(args)
    one_step.encode(loaded, [row], [pair])  # a triple or pair over the context fails here, named as the user gave it
    rm, params = one_step.reward_model("im", loaded, beta=beta)
    result = rho_analysis(
        rm, params, prompt=row.prompt, chosen=row.chosen, rejected=row.rejected, unseen_prompt=pair.prompt,
        unseen_response=pair.response, tokenizer=loaded.tokenizer, lr=lr, exclude_closing=args.exclude_closing,
    )  # fmt: skip
    print(
        f"ρ analysis (IM-RM, β = {beta:g}) of ȳ = {pair.response!r} ({pairs_from}) against the triple from "
        f"{rows_from}: y+ = {row.chosen!r}, y− = {row.rejected!r}; model {loaded.name}; "
        f"closing tokens {'excluded' if args.exclude_closing else 'included'} ({time.perf_counter() - t0:.1f} s)"
    )
    print("\n".join(summary(result)))
    data = result.to_dict()
    data["model"] = loaded.describe()
    png, js = rho_figure(data, f"{args.out}/rho.png")
    print(f"wrote {png} and {js}")
    return 0
