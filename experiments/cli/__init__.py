"""The `rmdyn` command line (console script `experiments.cli:entry`).

`main` runs one command in this process (for tests and library use); `entry` is the installed script, which also
owns Ctrl-C (`experiments.cli.interrupt`). Importing this package, building the parser and `rmdyn --version` import
nothing from `dynamics` (and so no JAX): every command imports its heavy dependencies inside its `run`.
"""

from experiments.cli.main import COMMAND_MODULES, build_parser, entry, main, version

__all__ = ["COMMAND_MODULES", "build_parser", "entry", "main", "version"]
