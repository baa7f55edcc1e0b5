"""Benchmark of the contribution matrix (docs/math.md §10.1, §10.2): its total time against the floor of
(number of per-sequence gradients) × one single-sequence gradient, and its peak memory as N grows.

Timing, in one process: N training pairs (Persona agreeableness statements, the plan's training-style yes/no
responses drawn in turn) and M eval pairs (the same statements with the paraphrase responses), every parameter
trainable by default, projected to k dimensions (or exact with --project 0):

  (a) one single-sequence gradient: `jax.grad` of one row's reward with respect to every trainable parameter, at
      the padded length of the sets (jitted, warm; the mean over `--repeats` rows);
  (b) `contribution_matrix` on all N × M, warm (its block programs compiled first on one block of each set).

The ratio (b) / ((2N + 2M) × (a)) is the overhead over the floor of exact attribution (one backward pass per
sequence; the goal is ≤ 1.3). `--memory N,N,...` instead runs the whole computation once per N in a fresh
subprocess and reports each one's peak resident memory (`ru_maxrss`): flat in N means that nothing grows with the
training set but the [M, N] result. No JAX import at module level (the CLI registers this module cheaply).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

__all__ = ["DESCRIPTION", "add_arguments", "bench_attribute", "bench_rows", "peak_memory", "run"]

DESCRIPTION = "contribution matrix C: total time vs (2N + 2M) single-sequence gradients, peak memory vs N"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `rmdyn bench attribute`."""
    parser.add_argument("--pairs", type=int, default=256, help="training pairs N (default 256)")
    parser.add_argument("--eval", type=int, default=64, help="eval pairs M (default 64)")
    parser.add_argument("--project", type=int, default=2048, help="projection size k; 0 for exact (default 2048)")
    parser.add_argument("--params", default="all", help="trainable parameters (default all)")
    parser.add_argument("--reward", choices=("ex", "im"), default="im", help="reward type (default im)")
    parser.add_argument("--block", type=int, default=8, help="sequences per backward-pass block (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="rows timed for the single gradient (default 3)")
    parser.add_argument("--memory", default=None, metavar="N,N,...",
                        help="instead of timing: peak resident memory of the whole run for each N, each in a fresh "
                             "process (e.g. 64,128,256,512)")  # fmt: skip
    parser.add_argument("--model", default=None, metavar="PATH", help="model (default SmolLM2-135M-Instruct)")
    parser.add_argument("--out", default=None, help="write bench_attribute.json here")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)


def bench_rows(n_train: int, n_eval: int) -> tuple[list[Any], list[Any]]:
    """(n_train training triples, n_eval eval triples) on the Persona agreeableness statements.

    Training responses are the plan's yes/no prefixes and words in turn; eval responses the paraphrases. The
    statements repeat once they run out (each repeat with the next response combination).
    """
    import itertools

    from dynamics.datasets import PreferenceRow, load_persona
    from experiments.plans.grammar import load_plan
    from experiments.studies.bundled import bundled_data_path

    v = load_plan("persona").values
    prompts = [r.prompt for r in load_persona(bundled_data_path("persona/agreeableness.jsonl"))]
    train_combos = list(itertools.product(v["prefixes_yes"], v["words_yes"], v["prefixes_no"], v["words_no"]))
    eval_combos = list(
        itertools.product(v["eval_prefixes_yes"], v["eval_words_yes"], v["eval_prefixes_no"], v["eval_words_no"])
    )

    def rows(n: int, combos: list[tuple[str, ...]], offset: int) -> list[Any]:
        out = []
        for i in range(n):
            py, wy, pn, wn = combos[(i // len(prompts) + i) % len(combos)]
            out.append(PreferenceRow(prompts[(offset + i) % len(prompts)], py + wy, pn + wn, i, "bench", i))
        return out

    return rows(n_train, train_combos, 0), rows(n_eval, eval_combos, n_train)


def _setup(loaded: Any, n_train: int, n_eval: int, reward: str):
    from dynamics.attribution import EvalSet
    from experiments.studies import one_step

    train_rows, eval_rows = bench_rows(n_train, n_eval)
    train = one_step.encode_triples(loaded, train_rows)
    ev = one_step.encode_triples(loaded, eval_rows)
    rm, params = one_step.reward_model(reward, loaded)
    return rm, params, train, EvalSet(ev.chosen, ev.rejected)


def _single_gradient_s(rm: Any, params: Any, spec: str, batch: Any, repeats: int) -> float:
    """Mean wall time of one row's full reward gradient (jitted, warm), over `repeats` rows of `batch`."""
    import jax

    from dynamics.chunking import strip
    from dynamics.masks import combine, partition, prepare, trainable_mask

    rm, params, spec = prepare(rm, params, spec)
    tree, frozen = partition(params, trainable_mask(rm, params, spec))
    grad = jax.jit(jax.grad(lambda t, row: rm.reward(combine(t, frozen), row).sum()))
    rows = [strip(batch.select([i % batch.batch_size])) for i in range(repeats + 1)]
    jax.block_until_ready(grad(tree, rows[0]))
    t0 = time.perf_counter()
    for row in rows[1:]:
        jax.block_until_ready(grad(tree, row))
    return (time.perf_counter() - t0) / repeats


def bench_attribute(loaded: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The timing side of the benchmark (module docstring): times, the floor and the ratio."""
    from dynamics.attribution import contribution_matrix

    rm, params, train, ev = _setup(loaded, args.pairs, args.eval, args.reward)
    mode = "exact" if args.project == 0 else "projected"
    opts = dict(params_spec=args.params, mode=mode, project=args.project or None, block=args.block)
    t0 = time.perf_counter()
    contribution_matrix(rm, params, train.select(range(min(args.block, args.pairs))),
                        ev.select(range(min(args.block, args.eval))), **opts)  # fmt: skip
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    c = contribution_matrix(rm, params, train, ev, progress=True, **opts)
    total = time.perf_counter() - t0
    single = _single_gradient_s(rm, params, args.params, train.chosen, args.repeats)
    passes = c.meta["backward_passes"]
    return {
        "model": loaded.name, "reward": args.reward, "params": args.params, "mode": mode, "project": args.project,
        "n_train": args.pairs, "n_eval": args.eval, "seq_len": [train.chosen.seq_len, ev.chosen.seq_len],
        "n_trained": c.meta["n_trained"], "block": args.block, "warm_up_s": warm, "total_s": total,
        "single_gradient_s": single, "backward_passes": passes, "ratio_to_floor": total / (passes * single),
    }  # fmt: skip


def peak_memory(args: argparse.Namespace, sizes: list[int]) -> list[dict[str, Any]]:
    """Peak resident memory (bytes) of the whole attribution for each N, each run in a fresh process."""
    out = []
    for n in sizes:
        options = {k: v for k, v in vars(args).items() if k != "func"} | {"pairs": n, "memory": None}
        code = (
            "import json; from experiments.benchmarks.attribute import _child; "
            f"_child(json.loads({json.dumps(options)!r}))"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench attribute --memory N={n} failed:\n{proc.stderr[-2000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        # each size as it finishes (stderr): a long sweep stopped midway keeps what it measured
        row = out[-1]
        line = f"  N = {n}: peak {row['peak_rss_bytes'] / 2**30:.2f} GiB, {row['seconds']:.1f} s"
        print(line, file=sys.stderr, flush=True)
    return out


def _child(options: dict[str, Any]) -> None:
    """One --memory run: the whole attribution, then the process's peak RSS as a JSON line."""
    import resource

    from dynamics.attribution import contribution_matrix
    from experiments.cli.inputs import load_model

    args = argparse.Namespace(**options)
    loaded = load_model(args)
    rm, params, train, ev = _setup(loaded, args.pairs, args.eval, args.reward)
    t0 = time.perf_counter()
    mode = "exact" if args.project == 0 else "projected"
    contribution_matrix(
        rm, params, train, ev, params_spec=args.params, mode=mode, project=args.project or None, block=args.block
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    print(json.dumps({"N": args.pairs, "peak_rss_bytes": rss, "seconds": time.perf_counter() - t0}))


def run(args: argparse.Namespace) -> int:
    """Prints the benchmark."""
    from dynamics.errors import ConfigError

    if min(args.pairs, args.eval, args.block, args.repeats) < 1 or args.project < 0:
        raise ConfigError("--pairs, --eval, --block and --repeats must be ≥ 1, --project ≥ 0")
    if args.memory:
        try:
            sizes = [int(x) for x in args.memory.split(",")]
        except ValueError as err:
            raise ConfigError(f"--memory must be comma-separated integers, got {args.memory!r}") from err
        rows = peak_memory(args, sizes)
        print(f"bench attribute --memory: peak resident memory of the whole run, M = {args.eval} eval pairs, "
              f"params {args.params}, {'exact' if args.project == 0 else f'k = {args.project}'}")  # fmt: skip
        print(f"{'N':>6} {'peak GiB':>9} {'seconds':>9}")
        for r in rows:
            print(f"{r['N']:>6} {r['peak_rss_bytes'] / 2**30:>9.2f} {r['seconds']:>9.1f}")
        _write(args, {"memory": rows, "n_eval": args.eval, "params": args.params, "project": args.project})
        return 0
    from experiments.cli.inputs import load_model

    r = bench_attribute(load_model(args), args)
    print(
        f"bench attribute: N = {r['n_train']} training × M = {r['n_eval']} eval pairs (lengths {r['seq_len']}), "
        f"{r['reward'].upper()}-RM on {r['model']}, params {r['params']} ({r['n_trained']:,}), {r['mode']}"
        + (f" k = {r['project']}" if r["mode"] == "projected" else "")
    )
    print(f"  warm-up (compile, one block of each set): {r['warm_up_s']:.1f} s")
    print(f"  (a) one single-sequence gradient:  {r['single_gradient_s']:.3f} s")
    print(f"  (b) contribution matrix, total:    {r['total_s']:.1f} s over {r['backward_passes']} sequences")
    print(f"  ratio (b) / ({r['backward_passes']} × (a)) = {r['ratio_to_floor']:.2f}")
    _write(args, r)
    return 0


def _write(args: argparse.Namespace, data: dict[str, Any]) -> None:
    if args.out:
        from dynamics.outputs import write_json_atomic

        print(f"wrote {write_json_atomic(f'{args.out}/bench_attribute.json', data)}")
