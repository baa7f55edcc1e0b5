"""`rmdyn bench` targets, one module each: `DESCRIPTION`, `add_arguments(parser)`, `run(args) -> int`.

They print timings and ratios, never assertions, and import JAX only inside `run` (registration stays cheap).
"""

__all__: list[str] = []
