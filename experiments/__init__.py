"""rmdyn.experiments: runnable studies, configs, benchmarks and the `rmdyn` command line."""
