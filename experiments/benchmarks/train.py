"""Benchmark of one training step: rmdyn's jitted step against transformers' PyTorch model with torch's Adam.

The setting of issue 7: IM-RM with a frozen reference (its log-probabilities precomputed, as both trainers do), the
Bradley-Terry (DPO) loss, every parameter trainable, Adam, a batch of `--pairs` preference pairs of `--tokens`
tokens each (chosen and rejected: 2 × pairs sequences), split into micro-batches with gradient accumulation.
Both sides start from the same weights (the default model's GGUF) and see the same token ids; both compute logits
only at the positions that predict response tokens; torch runs with as many threads as the machine has cores,
the number XLA uses. rmdyn's side is exactly what `dynamics.training.train` runs (`compile_step(...).micro_step`
and `.apply`). Each pair is a real UltraFeedback prompt (the first T − R tokens, the same on both sides) and its
chosen or rejected response (R tokens). rmdyn runs twice: as it trains by default (each pair packed into one row
holding the prompt once, `dynamics.packing`) and with `pack_pairs=False` (the two sequences separately, as torch
runs them: the like-for-like comparison of the kernels). Both run each micro-batch in passes of at most
`TrainConfig.pass_positions` positions, as the trainer does (on CPU 1024 by default: 4 packed pairs of 192
positions); torch then runs twice too, in micro-batches of `--micro-batch` pairs and in micro-batches of as many
pairs as rmdyn's passes hold, so that neither side is compared at a batch size only the other one gets. Prints
seconds per step and tokens per second (tokens of the batch, 2 × pairs × T, for every side), and the ratios;
asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

__all__ = ["DESCRIPTION", "add_arguments", "bench_train", "run"]

DESCRIPTION = "one IM-RM training step (all parameters, Adam): rmdyn's jitted step vs transformers + torch.optim.Adam"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `rmdyn bench train`."""
    parser.add_argument("--pairs", type=int, default=32, help="preference pairs per step (default 32)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--response-tokens", type=int, default=64, help="response tokens per sequence (64)")
    parser.add_argument("--micro-batch", type=int, default=8, help="pairs per micro-batch (default 8)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per side after a warm-up (2)")
    parser.add_argument("--params", default="all", help="trainable parameters (default all)")
    parser.add_argument("--skip-torch", action="store_true", help="time rmdyn only")
    parser.add_argument("--packed-only", action="store_true", help="skip the run with pack_pairs=False")
    parser.add_argument(
        "--pass-positions", type=int, default=None, help="rmdyn's TrainConfig.pass_positions (default: the engine's)"
    )
    parser.add_argument("--model", default=None, help="a .gguf file or HF directory, both sides (default: SmolLM2)")
    parser.add_argument("--out", default=None, help="write bench_train.json here")


def _fit(ids: list[int], n: int) -> list[int]:
    """`ids` repeated until there are n, then cut to n."""
    ids = list(ids) or [0]
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def _token_batch(tokenizer, pairs: int, T: int, R: int):
    """Real preference pairs as a DPO trainer sees them: UltraFeedback prompt (T − R tokens, the same in the
    chosen and the rejected sequence) followed by the chosen or rejected response (R tokens)."""
    import numpy as np

    from dynamics.datasets import load_preferences
    from experiments.studies.bundled import bundled_data_path

    rows = load_preferences(bundled_data_path("preferences/ultrafeedback.test.jsonl"))
    out = {}
    for side in ("chosen", "rejected"):
        tok = np.zeros((pairs, T), np.int32)
        for i in range(pairs):
            r = rows[i % len(rows)]
            prompt = _fit(tokenizer.encode(r.prompt + "\n", add_special_tokens=False), T - R)
            tok[i] = prompt + _fit(tokenizer.encode(getattr(r, side), add_special_tokens=False), R)
        resp = np.zeros((pairs, T), np.int32)
        resp[:, T - R :] = 1
        out[side] = {"tokens": tok, "attention_mask": np.ones((pairs, T), np.int32), "response_mask": resp}
    return out


def _rmdyn_step(loaded, batch, micro: int, spec: str, repeats: int, pack: bool = True, pass_positions=None):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dynamics.masks import partition, prepare, trainable_mask
    from dynamics.rewards import ImplicitRM
    from dynamics.training import (
        OptimizerSpec,
        PairSet,
        Rows,
        TrainConfig,
        accumulate_gradients,
        compile_step,
        pass_limit,
        response_index,
    )

    config = TrainConfig(lr=1e-6)
    rm = ImplicitRM(loaded.lm)
    rm, params, spec = prepare(rm, rm.init(loaded.params), spec)
    mask = trainable_mask(rm, params, spec)
    train_tree, frozen = partition(params, mask)
    train_tree = jax.tree.map(jnp.copy, {k: v for k, v in train_tree.items() if k != "ref"})  # donated below
    frozen = {k: v for k, v in frozen.items() if k != "ref"}  # π_ref's log-probs are precomputed
    compiled = compile_step(rm, 0, OptimizerSpec.from_config(config))
    opt_state = compiled.tx.init(train_tree)
    pairs = batch["chosen"]["tokens"].shape[0]
    micro_batches = [np.arange(s, min(s + micro, pairs)) for s in range(0, pairs, micro)]
    # the default bucket (16): T and the response length R stay as given
    config = TrainConfig(lr=1e-6, pack_pairs=pack, pass_positions=pass_positions)
    rows = {side: Rows(**batch[side]) for side in ("chosen", "rejected")}
    # reference log-probs, precomputed once (not timed), exactly as train() does
    ref = {}
    for side in ("chosen", "rejected"):
        f = response_index(rows[side], config.bucket)
        ref[side] = np.asarray(compiled.logprob(params["ref"], jax.tree.map(jnp.asarray, f)))
    data = PairSet(rows["chosen"], rows["rejected"], ref["chosen"], ref["rejected"])

    def step(train_tree, opt_state):
        acc, stats, counts = accumulate_gradients(compiled, train_tree, frozen, micro_batches, data, config)
        new_tree, new_opt, gnorm = compiled.apply(train_tree, opt_state, acc, jnp.asarray(stats["rows"], jnp.float32))
        jax.block_until_ready(new_tree)
        return new_tree, new_opt, float(gnorm), counts

    t0 = time.perf_counter()
    train_tree, opt_state, _, counts = step(train_tree, opt_state)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        train_tree, opt_state, gnorm, _ = step(train_tree, opt_state)
        times.append(time.perf_counter() - t0)
    return {
        "first_s": first,
        "step_s": min(times),
        "grad_norm": gnorm,
        "trained": spec,
        "pack_pairs": pack,
        "pass_positions": pass_limit(config),
        **counts,
    }


def _torch_step(batch, micro: int, repeats: int, beta: float = 0.01, model_source: str | None = None):
    import torch
    import transformers

    from dynamics.models import default_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    path = default_model_path() if model_source in (None, "", "default") else model_source
    if os.path.isdir(path):  # a Hugging Face directory
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
        )
    model.train()
    for mod in model.modules():  # no dropout anywhere: same function as rmdyn's
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    opt = torch.optim.Adam(model.parameters(), lr=1e-6)
    pairs, T = batch["chosen"]["tokens"].shape

    def seq_logprob(tokens, mask, resp):
        hidden = model.model(input_ids=tokens, attention_mask=mask).last_hidden_state
        src = (resp[:, 1:] > 0).nonzero(as_tuple=True)  # positions t−1 that predict response tokens t
        h = hidden[src[0], src[1]]
        logits = model.lm_head(h).float()
        tgt = tokens[:, 1:][src[0], src[1]]
        lp = torch.log_softmax(logits, -1).gather(-1, tgt[:, None])[:, 0]
        return torch.zeros(tokens.shape[0]).index_add(0, src[0], lp)

    def tensors(side, idx):
        b = batch[side]
        return tuple(torch.tensor(b[k][idx], dtype=torch.long) for k in ("tokens", "attention_mask", "response_mask"))

    micro_batches = [list(range(s, min(s + micro, pairs))) for s in range(0, pairs, micro)]
    with torch.no_grad():
        ref = {s: torch.cat([seq_logprob(*tensors(s, i)) for i in micro_batches]) for s in ("chosen", "rejected")}

    def step():
        opt.zero_grad(set_to_none=True)
        for idx in micro_batches:
            rc = beta * (seq_logprob(*tensors("chosen", idx)) - ref["chosen"][idx])
            rr = beta * (seq_logprob(*tensors("rejected", idx)) - ref["rejected"][idx])
            loss = -torch.nn.functional.logsigmoid(rc - rr).sum() / pairs
            loss.backward()
        opt.step()

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "step_s": min(times), "threads": torch.get_num_threads()}


def bench_train(
    pairs=32,
    tokens=128,
    response_tokens=64,
    micro=8,
    repeats=2,
    spec="all",
    skip_torch=False,
    unpacked=True,
    pass_positions=None,
    model=None,
):
    """Seconds per step and tokens/s of both trainers on the same batch; `ratio` = torch time / rmdyn time.

    "rmdyn" is the default trainer (pairs packed with their prompt once, `dynamics.packing`; micro-batches run
    in passes of ≤ `pass_positions` positions); with `unpacked`, "rmdyn_unpacked" runs the same step on the two
    sequences of each pair separately, as the torch side does (the like-for-like kernel comparison), and
    `ratio_unpacked` is torch time over its time. When rmdyn's passes hold fewer pairs than a micro-batch,
    "torch_passes" times torch in micro-batches of that many pairs, and `ratio_passes` is its time over rmdyn's.
    """
    from dynamics.errors import ConfigError

    if min(pairs, tokens, micro, repeats) < 1 or not 1 <= response_tokens < tokens:
        raise ConfigError(
            "--pairs, --tokens, --micro-batch, --repeats must be ≥ 1 and 1 ≤ --response-tokens < --tokens"
        )
    from dynamics.loading import load  # JAX: after the checks

    loaded = load(model)
    batch = _token_batch(loaded.tokenizer, pairs, tokens, response_tokens)
    n_tokens = 2 * pairs * tokens
    out: dict[str, Any] = {"pairs": pairs, "tokens": tokens, "response_tokens": response_tokens,
                           "micro_batch": micro, "tokens_per_step": n_tokens}  # fmt: skip
    sides = [("rmdyn", True)] + ([("rmdyn_unpacked", False)] if unpacked else [])
    for name, pack in sides:
        out[name] = _rmdyn_step(loaded, batch, micro, spec, repeats, pack=pack, pass_positions=pass_positions)
        out[name]["tokens_per_s"] = n_tokens / out[name]["step_s"]
    if not skip_torch:
        out["torch"] = _torch_step(batch, micro, repeats, model_source=model)
        out["torch"]["tokens_per_s"] = n_tokens / out["torch"]["step_s"]
        out["ratio"] = out["torch"]["step_s"] / out["rmdyn"]["step_s"]
        if unpacked:
            out["ratio_unpacked"] = out["torch"]["step_s"] / out["rmdyn_unpacked"]["step_s"]
        pass_pairs = -(-pairs // out["rmdyn"]["passes"])  # pairs per pass of rmdyn's default step
        if pass_pairs < micro:
            out["torch_passes"] = _torch_step(batch, pass_pairs, repeats, model_source=model)
            out["torch_passes"]["micro_batch"] = pass_pairs
            out["torch_passes"]["tokens_per_s"] = n_tokens / out["torch_passes"]["step_s"]
            out["ratio_passes"] = out["torch_passes"]["step_s"] / out["rmdyn"]["step_s"]
    return out


def run(args: argparse.Namespace) -> int:
    from dynamics.errors import ConfigError

    if min(args.pairs, args.tokens, args.micro_batch, args.repeats) < 1 or not 1 <= args.response_tokens < args.tokens:
        raise ConfigError(
            "--pairs, --tokens, --micro-batch, --repeats must be ≥ 1 and 1 ≤ --response-tokens < --tokens"
        )
    if args.pass_positions is not None and args.pass_positions < 0:
        raise ConfigError(f"--pass-positions must be ≥ 0, got {args.pass_positions}")
    from experiments.cli.preflight import check_model_source, check_output_dir

    check_model_source(args.model)
    if args.out:
        check_output_dir(args.out, "--out", files=["bench_train.json"])
    res = bench_train(args.pairs, args.tokens, args.response_tokens, args.micro_batch, args.repeats, args.params,
                      args.skip_torch, not args.packed_only, args.pass_positions, args.model)  # fmt: skip
    print(
        f"training step: IM-RM (β = 0.01, reference precomputed), DPO loss, Adam, {res['pairs']} pairs × "
        f"{res['tokens']} tokens = {res['tokens_per_step']:,} tokens (a shared prompt of "
        f"{res['tokens'] - res['response_tokens']} tokens per pair), micro-batches of {res['micro_batch']} pairs"
    )
    labels = {"rmdyn": "rmdyn (pairs packed, the default)", "rmdyn_unpacked": "rmdyn (pack_pairs=False)",
              "torch": "transformers + torch.optim.Adam"}  # fmt: skip
    if "torch_passes" in res:
        labels["torch_passes"] = f"torch, micro-batches of {res['torch_passes']['micro_batch']} pairs"
    for side in ("rmdyn", "rmdyn_unpacked", "torch", "torch_passes"):
        if side in res:
            r = res[side]
            if side.startswith("rmdyn"):
                print(f"  {labels[side]}: {r['passes']} passes per step (pass_positions {r['pass_positions']})")
            print(f"  {labels[side]:<34} {r['step_s']:8.2f} s/step  {r['tokens_per_s']:8.1f} tokens/s  (first "
                  f"step, incl. compile/warm-up: {r['first_s']:.1f} s)")  # fmt: skip
    if "ratio" in res:
        print(f"  speed-up of rmdyn over transformers + torch.optim.Adam: {res['ratio']:.2f}×")
    if "ratio_unpacked" in res:
        print(f"  without packing (the same sequences as torch, like for like): {res['ratio_unpacked']:.2f}×")
    if "ratio_passes" in res:
        print(f"  over torch in micro-batches of rmdyn's pass size ({res['torch_passes']['micro_batch']} pairs): "
              f"{res['ratio_passes']:.2f}×")  # fmt: skip
    if args.out:
        from dynamics.outputs import write_json_atomic

        print(f"wrote {write_json_atomic(os.path.join(args.out, 'bench_train.json'), res)}")
    return 0
