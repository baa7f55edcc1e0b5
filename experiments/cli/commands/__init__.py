"""Sub-commands of `rmdyn`, one module each, exposing `register(subparsers)` (see experiments.cli.main)."""

__all__: list[str] = []
