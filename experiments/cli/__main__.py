"""`python -m experiments.cli ARGS` runs the `rmdyn` command line (the same as the installed `rmdyn` script)."""

from experiments.cli.main import entry

__all__: list[str] = []

if __name__ == "__main__":
    entry()
