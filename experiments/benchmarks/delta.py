"""Benchmark of the eNTK Δr (docs/math.md §3): VJP + JVP against a forward pass and against
materialized per-example gradients.

On B unseen pairs (Persona paraphrases on the agreeableness prompts) with every parameter trainable, measured
side by side in one process on the same chunks of pairs:

  (a) forward: the jitted reward of the B pairs (no derivative), chunk by chunk;
  (b) ntk: Δr of the B pairs as `dynamics.delta` computes it with decompose off: one VJP for the training
      direction Δθ/η, then one JVP per chunk along it; timed with and without the VJP;
  (c) per-example gradients: ∇r(u) of every pair materialized (a VJP per pair, vmapped over a small chunk: the
      chunk's gradients are a [C, n_params] array), then the dot products with the same direction.

Each side is called once first (compile + run, reported separately) and then timed `--repeats` times; the minimum
is kept. Prints the times and the ratios (b)/(a) and (c)/(b), and the largest difference between (b) and (c).
No JAX import at module level (the CLI registers this module cheaply).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

__all__ = ["DESCRIPTION", "PARAPHRASES", "add_arguments", "bench_delta", "bench_pairs", "memory_curve", "run"]

DESCRIPTION = "eNTK Δr (VJP + chunked JVP) vs a forward pass and vs materialized per-example gradients"
PARAPHRASES = (
    "My response would be certainly",
    "My response would be absolutely",
    "I lean toward not really",
    "I lean toward nope",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `rmdyn bench delta`."""
    parser.add_argument("--pairs", type=int, default=64, help="number B of unseen pairs (default 64)")
    parser.add_argument("--chunk-size", type=int, default=16, help="pairs per forward / JVP call (default 16)")
    parser.add_argument("--grad-chunk-size", type=int, default=4,
                        help="pairs per vmapped per-example-gradient call of the baseline (default 4; "
                        "memory ∝ chunk × n_params)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions, the minimum is kept (default 2)")
    parser.add_argument("--reward", choices=("ex", "im"), default="im", help="reward type (default im)")
    parser.add_argument("--model", default=None, metavar="PATH", help="model (default SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--memory",
        default=None,
        metavar="B,B,...",
        help="instead of timing: compiled peak memory of ntk Δr (chunks of --chunk-size) and of a baseline that "
        "materializes all B per-example gradients at once, for each B (e.g. 8,16,32,64,128,256); nothing runs",
    )
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)


def bench_pairs(n: int) -> list[Any]:
    """n unseen pairs: the four paraphrases on the agreeableness prompts in turn (the Persona training prompts)."""
    from dynamics.datasets import UnseenPair, load_persona, persona_split
    from experiments.studies.bundled import bundled_data_path

    train, test = persona_split(load_persona(bundled_data_path("persona/agreeableness.jsonl")), rng="torch")
    prompts = [r.prompt for r in train + test]
    return [
        UnseenPair(prompts[(i // len(PARAPHRASES)) % len(prompts)], PARAPHRASES[i % len(PARAPHRASES)], None, "bench", i)
        for i in range(n)
    ]


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t0, out


def _per_example_dots(rm: Any, train_tree: Any, frozen: Any, direction: Any, chunk: Any) -> Any:
    """⟨∇r(u_i), direction⟩ for each row of the chunk, through the materialized gradients [C, ...]."""
    import jax
    import jax.numpy as jnp

    from dynamics.masks import combine

    def rewards(tr):
        return rm.reward(combine(tr, frozen), chunk)

    r, vjp = jax.vjp(rewards, train_tree)
    eye = jnp.eye(r.shape[0], dtype=r.dtype)
    grads = jax.vmap(lambda c: vjp(c)[0])(eye)  # per-example gradients, [C, ...] per leaf
    dots = jax.tree.map(lambda g, d: jnp.einsum("C...,...->C", g, d.astype(g.dtype)), grads, direction)
    return sum(jax.tree.leaves(dots))


def bench_delta(
    loaded: Any,
    n_pairs: int = 64,
    chunk_size: int = 16,
    grad_chunk_size: int = 4,
    repeats: int = 2,
    reward: str = "im",
) -> dict[str, Any]:
    """Times (a) the forward pass, (b) the eNTK Δr with and without its VJP, (c) per-example gradients.

    Returns:
      Seconds per side (best of `repeats`) and of the first call (compile + run), the ratios, the agreement of
      (b) and (c), and the settings.
    """
    import jax
    import numpy as np

    from dynamics.chunking import batch_chunks, strip
    from dynamics.delta import jvp_rewards_jit, unit_update
    from dynamics.errors import ConfigError
    from dynamics.masks import count_selected, partition, prepare, trainable_mask
    from experiments.studies.demo import demo_triple
    from experiments.studies.one_step import encode, reward_model

    if min(n_pairs, chunk_size, grad_chunk_size, repeats) < 1:
        raise ConfigError("--pairs, --chunk-size, --grad-chunk-size and --repeats must be ≥ 1")
    rm, params = reward_model(reward, loaded)
    train, unseen = encode(loaded, [demo_triple()], bench_pairs(n_pairs))
    rm, params, spec = prepare(rm, params, "all")
    mask = trainable_mask(rm, params, spec)
    train_tree, frozen = partition(params, mask)
    t_train = strip(train)
    chunks = batch_chunks(unseen, chunk_size)
    grad_chunks = batch_chunks(unseen, grad_chunk_size)
    forward = jax.jit(rm.reward)
    vjp_fn = jax.jit(unit_update, static_argnums=(0, 4))
    dots_fn = jax.jit(_per_example_dots, static_argnums=0)

    def side_a():
        return [forward(params, c) for c, _ in chunks]

    def side_vjp():
        return vjp_fn(rm, train_tree, frozen, t_train, "sgd")

    def side_jvp(direction):
        tangents = jax.tree.map(lambda x: x[None], direction)
        return [jvp_rewards_jit(rm, train_tree, frozen, tangents, c)[1][0] for c, _ in chunks]

    def side_c(direction):
        return [dots_fn(rm, train_tree, frozen, direction, c) for c, _ in grad_chunks]

    first: dict[str, float] = {}
    first["forward"], _ = _timed(side_a)
    first["vjp"], direction = _timed(side_vjp)
    first["jvp"], _ = _timed(lambda: side_jvp(direction))
    first["per_example"], _ = _timed(lambda: side_c(direction))
    best = {k: float("inf") for k in first}
    out_b = out_c = None
    for _ in range(repeats):
        best["forward"] = min(best["forward"], _timed(side_a)[0])
        t, direction = _timed(side_vjp)
        best["vjp"] = min(best["vjp"], t)
        t, out_b = _timed(lambda d=direction: side_jvp(d))
        best["jvp"] = min(best["jvp"], t)
        t, out_c = _timed(lambda d=direction: side_c(d))
        best["per_example"] = min(best["per_example"], t)
    ntk = np.concatenate([np.asarray(o)[:k] for o, (_, k) in zip(out_b, chunks, strict=True)])
    per_ex = np.concatenate([np.asarray(o)[:k] for o, (_, k) in zip(out_c, grad_chunks, strict=True)])
    ntk_total = best["vjp"] + best["jvp"]
    scale = max(float(np.abs(per_ex).max()), 1e-30)
    return {
        "model": loaded.name,
        "reward": reward,
        "n_pairs": n_pairs,
        "seq_len": unseen.seq_len,
        "n_trained": count_selected(params, mask),
        "chunk_size": chunk_size,
        "grad_chunk_size": grad_chunk_size,
        "repeats": repeats,
        "first_call_s": first,
        "best_s": best,
        "ntk_total_s": ntk_total,
        "ratio_ntk_over_forward": ntk_total / best["forward"],
        "ratio_jvp_over_forward": best["jvp"] / best["forward"],
        "ratio_per_example_over_ntk": best["per_example"] / ntk_total,
        "ratio_per_example_over_jvp": best["per_example"] / best["jvp"],
        "max_rel_diff_ntk_vs_per_example": float(np.abs(ntk - per_ex).max()) / scale,
    }


def _per_example_grad_dots(rm: Any, train_tree: Any, frozen: Any, direction: Any, batch: Any) -> Any:
    """⟨∇r(u_i), direction⟩ through per-example gradients: vmap over rows of grad of one row's reward.

    Each row is its own forward and backward (a batch of one), so the gradients [B, n_params] are materialized and
    memory grows linearly in B: the honest per-example-gradient baseline of the memory curve.
    """
    import jax
    import jax.numpy as jnp

    from dynamics.masks import combine

    def one(row: Any) -> Any:
        row1 = jax.tree.map(lambda x: x[None], row)
        return jax.grad(lambda tr: rm.reward(combine(tr, frozen), row1)[0])(train_tree)

    grads = jax.vmap(one)(batch)
    dots = jax.tree.map(lambda g, d: jnp.einsum("B...,...->B", g, d.astype(g.dtype)), grads, direction)
    return sum(jax.tree.leaves(dots))


def _abstract(tree: Any) -> Any:
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def memory_curve(loaded: Any, sizes: list[int], chunk_size: int = 16, reward: str = "im") -> dict[str, Any]:
    """XLA's compiled peak memory (temporaries + outputs, bytes) for B unseen pairs, without running anything.

    ntk: the VJP for the direction (independent of B) and the JVP of one chunk of `chunk_size` pairs (the same
    executable for every chunk, so the peak is flat in B once B ≥ chunk_size). Baseline: the per-example gradients
    of all B pairs at once (vmap of a one-row gradient: a [B, n_params] array) and their dot products with the
    direction.
    """
    import jax

    from dynamics.chunking import strip
    from dynamics.delta import jvp_rewards_jit, unit_update
    from dynamics.masks import partition, prepare, trainable_mask
    from experiments.studies.demo import demo_triple
    from experiments.studies.one_step import encode, reward_model

    rm, params = reward_model(reward, loaded)
    rm, params, spec = prepare(rm, params, "all")
    mask = trainable_mask(rm, params, spec)
    train_tree, frozen = partition(params, mask)
    train, unseen = encode(loaded, [demo_triple()], bench_pairs(max(sizes)))
    t_train = strip(train)
    vjp_c = jax.jit(unit_update, static_argnums=(0, 4)).lower(rm, train_tree, frozen, t_train, "sgd").compile()

    def peak(compiled) -> int:
        m = compiled.memory_analysis()
        return int(m.temp_size_in_bytes + m.output_size_in_bytes)

    direction = _abstract(train_tree)
    rows = []
    for B in sizes:
        chunk = strip(unseen.select(range(min(B, chunk_size))))
        tangents = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1, *x.shape), x.dtype), train_tree)
        jvp_c = jvp_rewards_jit.lower(rm, train_tree, frozen, tangents, _abstract(chunk)).compile()
        full = strip(unseen.select(range(B)))
        base_fn = jax.jit(_per_example_grad_dots, static_argnums=0)
        base_c = base_fn.lower(rm, train_tree, frozen, direction, _abstract(full)).compile()
        rows.append({"B": B, "ntk_bytes": max(peak(vjp_c), peak(jvp_c)), "baseline_bytes": peak(base_c)})
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(train_tree))
    return {"model": loaded.name, "reward": reward, "chunk_size": chunk_size, "trainable_bytes": params_bytes,
            "rows": rows}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Prints the benchmark."""
    from dynamics.errors import ConfigError
    from experiments.cli.inputs import load_model

    if min(args.pairs, args.chunk_size, args.grad_chunk_size, args.repeats) < 1:
        raise ConfigError("--pairs, --chunk-size, --grad-chunk-size and --repeats must be ≥ 1")
    if not args.tiny:
        from experiments.cli.preflight import check_model_source

        check_model_source(args.model)
    sizes = []
    if args.memory:
        try:
            sizes = [int(x) for x in args.memory.split(",")]
        except ValueError as err:
            raise ConfigError(f"--memory must be comma-separated integers, got {args.memory!r}") from err
        if min(sizes) < 1:
            raise ConfigError("--memory sizes must be ≥ 1")
    loaded = load_model(args)
    if args.memory:
        m = memory_curve(loaded, sizes, args.chunk_size, args.reward)
        gib = 2**30
        print(f"bench delta --memory: compiled peak memory (XLA temporaries + outputs), {m['reward'].upper()}-RM, "
              f"all parameters ({m['trainable_bytes'] / gib:.2f} GiB), ntk chunks of {m['chunk_size']}")  # fmt: skip
        print(f"{'B':>5} {'ntk GiB':>9} {'per-example baseline GiB':>25} {'baseline/ntk':>13}")
        for row in m["rows"]:
            a, b = row["ntk_bytes"] / gib, row["baseline_bytes"] / gib
            print(f"{row['B']:>5} {a:>9.2f} {b:>25.2f} {b / a:>13.1f}")
        return 0
    r = bench_delta(loaded, args.pairs, args.chunk_size, args.grad_chunk_size, args.repeats, args.reward)
    f, b = r["first_call_s"], r["best_s"]
    print(
        f"bench delta: {r['n_pairs']} unseen pairs × {r['seq_len']} tokens, {r['reward'].upper()}-RM on {r['model']}, "
        f"all {r['n_trained']:,} parameters trainable; best of {r['repeats']}"
    )
    print(
        f"  warm-up (compile + first run): forward {f['forward']:.1f} s, VJP {f['vjp']:.1f} s, "
        f"JVP {f['jvp']:.1f} s, per-example gradients {f['per_example']:.1f} s"
    )
    print(f"  (a) forward, reward only (chunks of {r['chunk_size']}):     {b['forward']:8.3f} s")
    print(f"  (b) ntk Δr: VJP (training direction)             {b['vjp']:8.3f} s")
    print(f"      ntk Δr: JVPs (chunks of {r['chunk_size']})                 {b['jvp']:8.3f} s")
    print(f"      ntk Δr: total                                {r['ntk_total_s']:8.3f} s")
    print(f"  (c) per-example gradients (chunks of {r['grad_chunk_size']}) + dots    {b['per_example']:8.3f} s")
    print(
        f"  ratio (b)/(a): {r['ratio_ntk_over_forward']:.2f}x with the VJP, {r['ratio_jvp_over_forward']:.2f}x without"
    )
    print(
        f"  ratio (c)/(b): {r['ratio_per_example_over_ntk']:.2f}x against the VJP + JVPs, "
        f"{r['ratio_per_example_over_jvp']:.2f}x against the JVPs alone"
    )
    print(f"  agreement: max |Δr_ntk − Δr_per-example| / max |Δr| = {r['max_rel_diff_ntk_vs_per_example']:.1e}")
    return 0
