"""`rmdyn footnote3`: Footnote 3's max-margin check on the pre-trained model (docs/math.md §6.2).

Seen differences z_i = h_{x_i,y_i+} − h_{x_i,y_i−} on the 80 Persona training prompts, the paraphrase differences
for the 4 (yes-word, no-word) combinations on the training and the test prompts, the max-margin direction u*
of the z_i, and the statistics of their inner products and cosines. Forward passes only (a few minutes on a
CPU). Writes OUT/footnote3.json and prints the table.

Examples:

    rmdyn footnote3                                   # the default model (SmolLM2-135M-Instruct)
    rmdyn footnote3 --model /path/Llama-3.2-1B-Instruct --out runs/footnote3-llama
    rmdyn footnote3 --set trait=openness              # any Persona plan key (experiments/plans/persona.toml)
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Adds the `footnote3` sub-command (no heavy imports here)."""
    parser = subparsers.add_parser(
        "footnote3",
        help="Footnote 3: seen vs paraphrase hidden-state differences and the max-margin direction u* (JSON)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="default", help="default, a .gguf file or a HF directory")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a Persona plan key (data options: trait, n_train, data_seed, eval_words_yes, ...)",
    )
    parser.add_argument("--chunk", type=int, default=16, help="sequences per forward pass (default 16)")
    parser.add_argument("--out", default="runs/footnote3", help="output directory (default runs/footnote3)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from dynamics.errors import ConfigError, DataError, SequenceTooLongError
    from experiments.cli.preflight import check_model_source, check_output_dir
    from experiments.plans.grammar import load_plan

    if args.chunk < 1:
        raise ConfigError(f"--chunk must be >= 1, got {args.chunk}")
    check_model_source(args.model)
    check_output_dir(args.out, "--out", files=["footnote3.json"])

    from experiments.studies.footnote3 import format_statistics, run_footnote3
    from experiments.studies.persona.data import persona_texts

    values = dict(load_plan("persona", None, [*args.overrides, f"model={args.model}"]).values)
    persona_texts(values)  # bad data fails before the model loads
    t0 = time.perf_counter()
    try:
        result = run_footnote3(values, chunk=args.chunk)
    except SequenceTooLongError as err:  # the library says "pass truncate=True": say it in this command's terms
        raise DataError(
            f"{err.where}: {err.lengths} = {err.total} tokens > max_length={err.max_length}; "
            "add --set truncate=true to cut prompts from the left"
        ) from None
    path = result.save(Path(args.out) / "footnote3.json")
    print(format_statistics(result))
    print(f"\n{time.perf_counter() - t0:.0f} s; wrote {path}")
    return 0
