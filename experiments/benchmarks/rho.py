"""Benchmark of ρ_{k,l}: rmdyn's vocabulary-chunked computation against the naive full-vocabulary one.

Both compute the same [|ȳ|, |v|] matrix ρ = ⟨e_{ȳ_k} − p_k, e_{v_l} − q_l⟩ on the default model's unembedding
(V = 49,152) and real hidden states of two long responses:

- naive: the full next-token distributions P [|ȳ|, V] and Q [|v|, V], then (onehot − P)(onehot − Q)ᵀ:
  peak extra memory O((|ȳ| + |v|)·V);
- rmdyn (`dynamics.kernels.rho_terms`): streams over vocabulary chunks, two passes (log-partitions, then ⟨p, q⟩),
  peak extra memory O((|ȳ| + |v|)·chunk).

Neither forms the |ȳ|×|v|×V tensor (at 512 × 512 that would be 51 GB in float32). Memory is XLA's compiled
peak temporary allocation (`memory_analysis().temp_size_in_bytes`), deterministic and independent of the machine's
load; time is the best of `--repeats` runs, compile excluded. Prints a table and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

__all__ = ["DESCRIPTION", "add_arguments", "bench_rho", "run"]

DESCRIPTION = "ρ for |ȳ| = |v| up to 512 on the default vocabulary: chunked vs full-vocabulary (time, peak memory)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `rmdyn bench rho`."""
    parser.add_argument("--lengths", default="64,128,256,512", help="|ȳ| = |v| values (default 64,128,256,512)")
    parser.add_argument("--chunk", type=int, default=8192, help="vocabulary chunk of rmdyn's version (8192)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions, the best is kept (3)")
    parser.add_argument("--model", default=None, help="model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--out", default=None, help="write bench_rho.json here")


def _naive(h_u, a, h_v, b, W):
    import jax

    V = W.shape[0]
    P = jax.nn.softmax(h_u @ W.T, axis=-1)
    Q = jax.nn.softmax(h_v @ W.T, axis=-1)
    return (jax.nn.one_hot(a, V, dtype=P.dtype) - P) @ (jax.nn.one_hot(b, V, dtype=Q.dtype) - Q).T


def _hidden_states(loaded, n: int):
    """Final hidden states of two real texts of at least n response tokens (UltraFeedback answers)."""
    import jax.numpy as jnp
    import numpy as np

    from dynamics.datasets import load_preferences
    from experiments.studies.bundled import bundled_data_path

    rows = load_preferences(bundled_data_path("preferences/ultrafeedback.test.jsonl"))
    texts = sorted((r.chosen for r in rows), key=len, reverse=True)[:2]
    out = []
    for text in texts:
        ids = loaded.tokenizer.encode(text, add_special_tokens=False)
        while len(ids) < n + 1:
            ids = ids + ids
        ids = ids[: n + 1]
        seq = jnp.asarray([ids], jnp.int32)
        h = loaded.lm.forward(loaded.params, seq, jnp.ones_like(seq))[0]
        out.append((np.asarray(h[:-1]), np.asarray(ids[1:], np.int32)))
    return out


def bench_rho(lengths=(64, 128, 256, 512), chunk: int = 8192, repeats: int = 3, model: str | None = None):
    """Time and compiled peak temporary memory of both versions at each length; max |difference| of ρ."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dynamics.kernels import rho_terms
    from dynamics.loading import load
    from dynamics.models import unembedding

    loaded = load(model)
    W = unembedding(loaded.params)
    V, D = W.shape
    (hu_all, a_all), (hv_all, b_all) = _hidden_states(loaded, max(lengths))
    ours_fn = jax.jit(lambda hu, a, hv, b, W: rho_terms(hu, a, hv, b, W, chunk=chunk).rho)
    naive_fn = jax.jit(_naive)
    rows = []
    for n in lengths:
        args = (jnp.asarray(hu_all[:n]), jnp.asarray(a_all[:n]), jnp.asarray(hv_all[:n]), jnp.asarray(b_all[:n]), W)
        row: dict[str, Any] = {"length": n}
        results = {}
        for name, fn in (("chunked", ours_fn), ("naive", naive_fn)):
            t0 = time.perf_counter()
            compiled = fn.lower(*args).compile()
            row[f"{name}_compile_s"] = time.perf_counter() - t0
            row[f"{name}_temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                out = jax.block_until_ready(compiled(*args))
                best = min(best, time.perf_counter() - t0)
            row[f"{name}_s"] = best
            results[name] = np.asarray(out, np.float64)
        row["max_abs_diff"] = float(np.abs(results["chunked"] - results["naive"]).max())
        row["time_ratio_naive_over_chunked"] = row["naive_s"] / row["chunked_s"]
        row["memory_ratio_naive_over_chunked"] = row["naive_temp_bytes"] / max(row["chunked_temp_bytes"], 1)
        row["klv_tensor_bytes"] = n * n * V * 4
        row["kv_bytes"] = 2 * n * V * 4
        rows.append(row)
    return {"vocab": int(V), "d_model": int(D), "chunk": chunk, "model": loaded.name, "rows": rows}


def run(args: argparse.Namespace) -> int:
    from dynamics.errors import ConfigError

    try:
        lengths = tuple(int(x) for x in args.lengths.split(","))
    except ValueError as err:
        raise ConfigError(f"--lengths must be comma-separated integers, got {args.lengths!r}") from err
    if not lengths or min(lengths) < 1 or args.repeats < 1 or args.chunk < 1:
        raise ConfigError("--lengths, --repeats and --chunk must be positive")
    from experiments.cli.preflight import check_model_source, check_output_dir

    check_model_source(args.model)
    if args.out:
        check_output_dir(args.out, "--out", files=["bench_rho.json"])
    res = bench_rho(lengths, args.chunk, args.repeats, args.model)
    mib = 2**20
    print(f"ρ benchmark: V = {res['vocab']:,}, D = {res['d_model']}, chunk = {res['chunk']}, {res['model']}")
    head = ("|ȳ|=|v|", "chunked s", "naive s", "naive/chunked", "chunked MiB", "naive MiB", "mem ratio",
            "(K+L)V MiB", "K·L·V MiB", "max|Δρ|")  # fmt: skip
    widths = (8, 10, 9, 13, 11, 10, 9, 10, 10, 9)
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True)))
    for r in res["rows"]:
        cells = (
            f"{r['length']}", f"{r['chunked_s']:.3f}", f"{r['naive_s']:.3f}",
            f"{r['time_ratio_naive_over_chunked']:.2f}", f"{r['chunked_temp_bytes'] / mib:.1f}",
            f"{r['naive_temp_bytes'] / mib:.1f}", f"{r['memory_ratio_naive_over_chunked']:.1f}",
            f"{r['kv_bytes'] / mib:.1f}", f"{r['klv_tensor_bytes'] / mib:.0f}", f"{r['max_abs_diff']:.1e}",
        )  # fmt: skip
        print(" ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    print("memory: XLA's compiled peak temporary allocation; time: best of --repeats, compile excluded")
    if args.out:
        import os

        from dynamics.outputs import write_json_atomic

        path = write_json_atomic(os.path.join(args.out, "bench_rho.json"), res)
        print(f"wrote {path}")
    return 0
