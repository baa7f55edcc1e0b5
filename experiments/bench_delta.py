"""Benchmark of the eNTK Δr (architecture.md, "The one identity"): VJP + JVP against a forward pass and against
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
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)


def bench_pairs(n: int) -> list[Any]:
    """n unseen pairs: the four paraphrases on the agreeableness prompts in turn (the Persona training prompts)."""
    from dynamics.datasets import UnseenPair, bundled_data_path, load_persona, persona_split

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

    from dynamics.delta import _chunks, _jvp_rewards_jit, strip, unit_update
    from dynamics.errors import ConfigError
    from dynamics.masks import count_selected, partition, prepare, trainable_mask
    from experiments.commands._dynamics import encode, reward_model
    from experiments.dynamics_demo import demo_triple

    if min(n_pairs, chunk_size, grad_chunk_size, repeats) < 1:
        raise ConfigError("--pairs, --chunk-size, --grad-chunk-size and --repeats must be ≥ 1")
    rm, params = reward_model(reward, loaded)
    train, unseen = encode(loaded, [demo_triple()], bench_pairs(n_pairs))
    rm, params, spec = prepare(rm, params, "all")
    mask = trainable_mask(rm, params, spec)
    train_tree, frozen = partition(params, mask)
    t_train = strip(train)
    chunks = _chunks(unseen, chunk_size)
    grad_chunks = _chunks(unseen, grad_chunk_size)
    forward = jax.jit(rm.reward)
    vjp_fn = jax.jit(unit_update, static_argnums=(0, 4))
    dots_fn = jax.jit(_per_example_dots, static_argnums=0)

    def side_a():
        return [forward(params, c) for c, _ in chunks]

    def side_vjp():
        return vjp_fn(rm, train_tree, frozen, t_train, "sgd")

    def side_jvp(direction):
        tangents = jax.tree.map(lambda x: x[None], direction)
        return [_jvp_rewards_jit(rm, train_tree, frozen, tangents, c)[1][0] for c, _ in chunks]

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


def run(args: argparse.Namespace) -> int:
    """Prints the benchmark."""
    from dynamics.errors import ConfigError
    from experiments.commands._dynamics import load_model

    if min(args.pairs, args.chunk_size, args.grad_chunk_size, args.repeats) < 1:
        raise ConfigError("--pairs, --chunk-size, --grad-chunk-size and --repeats must be ≥ 1")
    loaded = load_model(args)
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
