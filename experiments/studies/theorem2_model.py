"""Theorem 2 on real representations: SmolLM2's hidden states and unembedding on Persona prompts (issue 5).

Assumption 2 (one-token responses) on a real model: each Persona prompt (chat template with the generation prompt)
is followed by a single answer token y. The EX-RM reads h_{x,y}, the final hidden state at y; the IM-RM's logits
are W h_x, with h_x the state after the prompt, and W the rows of the (untied) unembedding for the answer tokens.
Assumption 1 holds by construction: the simulator trains only u, respectively W.

Answer words: affirmatives are the preferred responses (Persona keeps statements whose matching answer is "Yes"),
negatives the dispreferred ones. "Yes"/"Sure" and "No"/"Never" (the paper's training words, capitalised as they
open the assistant turn) are the seen tokens; every other affirmative and negative that is one token in this
position is unseen. A seed draws which seen affirmative and negative each training prompt gets.

All answers of one prompt are scored in one forward pass: the prompt, then every candidate token at the same
position, each attending only to the prompt and itself (`LM.forward`'s `positions` and `attn_mask`).
"""

from __future__ import annotations

import numpy as np

from dynamics.errors import ConfigError

__all__ = ["AFFIRMATIVE", "NEGATIVE", "SEEN", "answer_states", "model_problem", "single_token_answers"]

AFFIRMATIVE = ("Yes", "Sure", "Absolutely", "Certainly", "Definitely", "Indeed", "Yeah", "Yep", "Agreed",
               "Correct", "True", "Right", "Exactly", "Affirmative", "Totally")  # fmt: skip
NEGATIVE = ("No", "Never", "Nope", "Nah", "Not", "False", "Incorrect", "Wrong", "Hardly", "Disagree", "Negative",
            "Nothing", "Neither")  # fmt: skip
SEEN = ("Yes", "Sure", "No", "Never")


def single_token_answers(tokenizer, words) -> dict[str, int]:
    """The words that are exactly one token when they open the assistant turn, with that token's id."""
    from dynamics.rho import closing_token_count
    from dynamics.text import split_prompt_response

    n_close = closing_token_count(tokenizer)
    out = {}
    for w in words:
        _, response = split_prompt_response(tokenizer, "Question?", w)
        ids = tokenizer.encode(response, add_special_tokens=False)
        if len(ids) - n_close == 1:
            out[w] = ids[0]
    return out


def answer_states(lm, params, tokenizer, prompts: list[str], token_ids: list[int], batch_size: int = 16):
    """(h_x [P, D], h_{x,y} [P, T, D]) in float64: the state after each prompt, and at each one-token answer.

    One pass per prompt: [prompt | y_1 … y_T], every y_j at position len(prompt), reading the prompt and itself.
    """
    import jax
    import jax.numpy as jnp

    prefix = [
        tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True),
            add_special_tokens=False,
        )
        for p in prompts
    ]
    T = len(token_ids)
    width = max(map(len, prefix)) + T
    fwd = jax.jit(lm.forward)
    h_x, h_xy = [], []
    for start in range(0, len(prompts), batch_size):
        rows = prefix[start : start + batch_size]
        B = len(rows)
        tok = np.full((B, width), tokenizer.pad_id, np.int32)
        att = np.zeros((B, width), np.int32)
        pos = np.zeros((B, width), np.int32)
        mask = np.zeros((B, width, width), bool)
        for b, ids in enumerate(rows):
            n = len(ids)
            tok[b, :n], tok[b, n : n + T] = ids, token_ids
            att[b, : n + T] = 1
            pos[b, :n], pos[b, n : n + T] = np.arange(n), n
            mask[b, :n, :n] = np.tril(np.ones((n, n), bool))
            mask[b, n : n + T, :n] = True
            mask[b, np.arange(n, n + T), np.arange(n, n + T)] = True
        hidden = np.asarray(fwd(params, jnp.asarray(tok), jnp.asarray(att), jnp.asarray(pos), jnp.asarray(mask)))
        for b, ids in enumerate(rows):
            n = len(ids)
            h_x.append(hidden[b, n - 1])
            h_xy.append(hidden[b, n : n + T])
    return np.asarray(h_x, np.float64), np.asarray(h_xy, np.float64)


def model_problem(
    n_seeds: int = 1,
    seed: int = 0,
    *,
    model: str | None = None,
    trait: str = "agreeableness",
    n_train: int = 80,
    n_test: int = 40,
    loaded=None,
):
    """A `theory.theorem2.Theorem2Problem` batched over `n_seeds`, from the model's real representations.

    Args:
      n_seeds: how many draws of the training triples.
      seed: base seed (seed s uses `seed + s`).
      model: model source (default: SmolLM2-135M-Instruct).
      trait: the Persona file (agreeableness, openness, extraversion).
      n_train, n_test: prompts (docs/math.md §6.2's split, seed 875); training triples use the training prompts,
        evaluation triples every prompt.
      loaded: an already loaded model (`dynamics.loading.Loaded`), to skip loading.

    Returns:
      The problem: local vocabulary = the one-token answers (seen first), P = n_train + n_test prompts.
    """
    from dynamics.datasets import load_persona, persona_split
    from dynamics.loading import load
    from dynamics.models import unembedding
    from experiments.studies.bundled import bundled_data_path
    from theory.theorem2 import Theorem2Problem

    if n_seeds < 1:
        raise ConfigError(f"n_seeds must be ≥ 1, got {n_seeds}")
    loaded = loaded or load(model)
    tok = loaded.tokenizer
    good = single_token_answers(tok, AFFIRMATIVE)
    bad = single_token_answers(tok, NEGATIVE)
    missing = [w for w in SEEN if w not in good and w not in bad]
    if missing:
        raise ConfigError(f"the seen answers {missing} are not single tokens for this tokenizer")
    words = [w for w in SEEN if w in good] + [w for w in good if w not in SEEN]
    words += [w for w in SEEN if w in bad] + [w for w in bad if w not in SEEN]
    ids = [good.get(w, bad.get(w)) for w in words]
    is_good = np.array([w in good for w in words])
    rows = load_persona(bundled_data_path(f"persona/{trait}.jsonl"))
    train_rows, test_rows = persona_split(rows, n_train=n_train, n_test=n_test, seed=875)
    prompts = [r.prompt for r in train_rows] + [r.prompt for r in test_rows]
    h_x, h_xy = answer_states(loaded.lm, loaded.params, tok, prompts, ids)
    W = np.asarray(unembedding(loaded.params), np.float64)[ids]

    seen_good = [i for i, w in enumerate(words) if w in SEEN and is_good[i]]
    seen_bad = [i for i, w in enumerate(words) if w in SEEN and not is_good[i]]
    unseen_good = [i for i, w in enumerate(words) if w not in SEEN and is_good[i]]
    unseen_bad = [i for i, w in enumerate(words) if w not in SEEN and not is_good[i]]
    P = len(prompts)
    eval_pairs = [(a, b) for a in seen_good for b in seen_bad] + [(a, b) for a in unseen_good for b in unseen_bad]
    eval_triples = np.array([(p, a, b) for p in range(P) for a, b in eval_pairs], np.int32)
    trains = []
    for s in range(n_seeds):
        rng = np.random.default_rng(seed + s)
        trains.append(
            np.stack(
                [np.arange(n_train), rng.choice(seen_good, n_train), rng.choice(seen_bad, n_train)], axis=1
            ).astype(np.int32)
        )

    def rep(a):
        return np.broadcast_to(a, (n_seeds, *a.shape))

    return Theorem2Problem(
        h_pair=rep(h_xy),
        h_prompt=rep(h_x),
        unembedding=rep(W),
        train=np.stack(trains),
        eval_triples=rep(eval_triples),
        token_ids=tuple(int(i) for i in ids),
        token_names=tuple(words),
        source=f"{loaded.name.split(' (')[0]}, Persona {trait}",
    )
