"""Benchmark of one training step: rmdyn's jitted step against transformers' PyTorch model with torch's Adam.

The setting of issue 7: IM-RM with a frozen reference (its log-probabilities precomputed, as both trainers do), the
Bradley-Terry (DPO) loss, every parameter trainable, Adam, a batch of `--pairs` preference pairs of `--tokens`
tokens each (chosen and rejected: 2 × pairs sequences), split into micro-batches with gradient accumulation.
Both sides start from the same weights (the default model's GGUF) and see the same token ids; both compute logits
only at the positions that predict response tokens; torch runs with as many threads as the machine has cores,
the number XLA uses. rmdyn's side is exactly what `dynamics.train.train` runs (`_compiled_for(...).micro_step`
and `.apply`). Prints seconds per step and tokens per second for both, and the ratio; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

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
    parser.add_argument("--out", default=None, help="write bench_train.json here")


def _token_batch(tokenizer, pairs: int, T: int, R: int):
    """Real token ids: UltraFeedback chosen/rejected texts, cut to T tokens, the last R of them the response."""
    import numpy as np

    from dynamics.datasets import bundled_data_path, load_preferences

    rows = load_preferences(bundled_data_path("preferences/ultrafeedback.test.jsonl"))
    out = {}
    for side in ("chosen", "rejected"):
        tok = np.zeros((pairs, T), np.int32)
        for i in range(pairs):
            r = rows[i % len(rows)]
            ids = tokenizer.encode(r.prompt + "\n" + getattr(r, side), add_special_tokens=False)
            while len(ids) < T:
                ids = ids + ids
            tok[i] = ids[:T]
        resp = np.zeros((pairs, T), np.int32)
        resp[:, T - R :] = 1
        out[side] = {"tokens": tok, "attention_mask": np.ones((pairs, T), np.int32), "response_mask": resp}
    return out


def _rmdyn_step(loaded, batch, micro: int, spec: str, repeats: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dynamics.masks import partition, prepare, trainable_mask
    from dynamics.rewards import ImplicitRM
    from dynamics.train import TrainConfig, _accumulate, _compiled_for, _optimizer_key, response_index

    config = TrainConfig(lr=1e-6)
    rm = ImplicitRM(loaded.lm)
    rm, params, spec = prepare(rm, rm.init(loaded.params), spec)
    mask = trainable_mask(rm, params, spec)
    train_tree, frozen = partition(params, mask)
    train_tree = jax.tree.map(jnp.copy, {k: v for k, v in train_tree.items() if k != "ref"})  # donated below
    frozen = {k: v for k, v in frozen.items() if k != "ref"}  # π_ref's log-probs are precomputed
    compiled = _compiled_for(rm, 0, _optimizer_key(config))
    opt_state = compiled.tx.init(train_tree)
    pairs = batch["chosen"]["tokens"].shape[0]
    T = batch["chosen"]["tokens"].shape[1]
    micro_batches = [np.arange(s, min(s + micro, pairs)) for s in range(0, pairs, micro)]
    config = TrainConfig(lr=1e-6, bucket=T)
    data = batch
    # reference log-probs, precomputed once (not timed), exactly as train() does
    ref = {}
    for side in ("chosen", "rejected"):
        f = dict(batch[side])
        f.update(response_index(f["tokens"], f["response_mask"], T))
        ref[side] = np.asarray(compiled.logprob(params["ref"], {k: jnp.asarray(v) for k, v in f.items()}))
    ref = {"chosen": ref["chosen"], "rejected": ref["rejected"]}

    def step(train_tree, opt_state):
        acc, stats = _accumulate(compiled, train_tree, frozen, micro_batches, data, ref, config)
        new_tree, new_opt, gnorm = compiled.apply(train_tree, opt_state, acc, jnp.asarray(stats["rows"], jnp.float32))
        jax.block_until_ready(new_tree)
        return new_tree, new_opt, float(gnorm)

    t0 = time.perf_counter()
    train_tree, opt_state, _ = step(train_tree, opt_state)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        train_tree, opt_state, gnorm = step(train_tree, opt_state)
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "step_s": min(times), "grad_norm": gnorm, "trained": spec}


def _torch_step(batch, micro: int, repeats: int, beta: float = 0.01):
    import torch
    import transformers

    from dynamics.models import default_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    path = default_model_path()
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


def bench_train(pairs=32, tokens=128, response_tokens=64, micro=8, repeats=2, spec="all", skip_torch=False):
    """Seconds per step and tokens/s of both trainers on the same batch; `ratio` = torch time / rmdyn time."""
    from dynamics.errors import ConfigError
    from dynamics.loading import load

    if min(pairs, tokens, micro, repeats) < 1 or not 1 <= response_tokens < tokens:
        raise ConfigError(
            "--pairs, --tokens, --micro-batch, --repeats must be ≥ 1 and 1 ≤ --response-tokens < --tokens"
        )
    loaded = load()
    batch = _token_batch(loaded.tokenizer, pairs, tokens, response_tokens)
    n_tokens = 2 * pairs * tokens
    out: dict[str, Any] = {"pairs": pairs, "tokens": tokens, "micro_batch": micro, "tokens_per_step": n_tokens}
    out["rmdyn"] = _rmdyn_step(loaded, batch, micro, spec, repeats)
    out["rmdyn"]["tokens_per_s"] = n_tokens / out["rmdyn"]["step_s"]
    if not skip_torch:
        out["torch"] = _torch_step(batch, micro, repeats)
        out["torch"]["tokens_per_s"] = n_tokens / out["torch"]["step_s"]
        out["ratio"] = out["torch"]["step_s"] / out["rmdyn"]["step_s"]
    return out


def run(args: argparse.Namespace) -> int:
    res = bench_train(args.pairs, args.tokens, args.response_tokens, args.micro_batch, args.repeats, args.params,
                      args.skip_torch)  # fmt: skip
    print(
        f"training step: IM-RM (β = 0.01, reference precomputed), DPO loss, Adam, {res['pairs']} pairs × "
        f"{res['tokens']} tokens = {res['tokens_per_step']:,} tokens, micro-batches of {res['micro_batch']} pairs"
    )
    for side in ("rmdyn", "torch"):
        if side in res:
            r = res[side]
            print(f"  {side:<6} {r['step_s']:8.2f} s/step  {r['tokens_per_s']:8.1f} tokens/s  (first step, incl. "
                  f"compile/warm-up: {r['first_s']:.1f} s)")  # fmt: skip
    if "ratio" in res:
        print(f"  speed-up of rmdyn over transformers + torch.optim.Adam: {res['ratio']:.2f}×")
    if args.out:
        from dynamics.io import write_json_atomic

        print(f"wrote {write_json_atomic(os.path.join(args.out, 'bench_train.json'), res)}")
    return 0
