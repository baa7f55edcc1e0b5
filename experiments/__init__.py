"""rmdyn.experiments: the paper's studies, their plans and bundled data, the benchmarks and the `rmdyn` command line.

Layout, by role (the library `dynamics` never imports from here):

    cli/          the `rmdyn` entry point, one module per sub-command (cli/commands/), argument helpers, pre-flight
                  checks, Ctrl-C handling
    benchmarks/   `rmdyn bench` targets (timings and ratios, never assertions)
    studies/      one package per paper experiment (persona, hamiltonian, ultrafeedback: data, runner, report) with
                  its bundled data, the runner protocol and the shared training helper, and the single-module
                  studies (footnote3, theorem2_model, demo, one_step inputs)
    plans/        the plan grammar (TOML base + options grid + presets + --set) and the bundled plans
    records.py    reading run directories and Footnote-3 results back (for `rmdyn figures`)
"""

__all__: list[str] = []
