"""Sub-commands of `rmdyn`, one module each (see experiments.cli)."""
