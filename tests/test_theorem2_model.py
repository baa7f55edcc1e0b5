"""Theorem 2 on SmolLM2's real hidden states and unembedding (Persona prompts, one-token answers)."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.studies.theorem2_model import SEEN, model_problem, single_token_answers
from theory.theorem2 import Theorem2Config, simulate_theorem2


@pytest.fixture(scope="module")
def problem():
    return model_problem(n_seeds=2, seed=0, n_train=24, n_test=12)


def test_answers_are_single_tokens_and_seen_ones_present(problem):
    names = problem.token_names
    assert set(SEEN) <= set(names)
    assert len(names) >= 10  # several unseen affirmatives and negatives
    assert len(set(problem.token_ids)) == len(names)


def test_model_source_shows_theorem2(problem):
    res = simulate_theorem2(problem, Theorem2Config(n_steps=3000, n_grid=16))
    # IM-RM: fits the training pairs, exactly chance on unseen tokens, unseen rows of W bitwise unchanged
    assert np.all(res.train_acc_im[:, -1] == 1.0)
    assert np.all(res.acc_unseen_im == 0.5)
    assert np.all(res.max_unseen_row_change == 0.0)
    assert np.all(res.max_unseen_reward_diff_im == 0.0)
    # EX-RM: converges in direction to u*, and ranks unseen pairs as u* does
    cos = res.cos_u_star
    assert np.all(cos[:, -1] >= 0.99)
    assert np.all(cos[:, -1] >= cos[:, 1])
    np.testing.assert_array_equal(res.acc_unseen_ex[:, -1], res.u_star_acc_unseen)
    assert np.all(res.u_star_acc_unseen > 0.5)


def test_single_token_answers_filters_multi_token_words():
    from dynamics.models import default_model_path
    from dynamics.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_path())
    got = single_token_answers(tok, ["Yes", "Supercalifragilistic"])
    assert list(got) == ["Yes"]


def test_one_pass_answer_states_equal_separate_forwards():
    """[prompt | y_1 … y_T] with the candidates side by side = one plain forward of [prompt, y_j] per j."""
    import jax.numpy as jnp

    from dynamics.loading import load
    from experiments.studies.theorem2_model import answer_states

    loaded = load()
    tok = loaded.tokenizer
    prompts = ["Is the sky blue?", "Would you say that you like cats a lot?"]
    ids = [tok.encode("Yes")[0], tok.encode("No")[0], tok.encode("Maybe")[0]]
    h_x, h_xy = answer_states(loaded.lm, loaded.params, tok, prompts, ids)
    for p, prompt in enumerate(prompts):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        prefix = tok.encode(text, add_special_tokens=False)
        for j, y in enumerate(ids):
            seq = jnp.asarray([prefix + [y]], jnp.int32)
            h = np.asarray(loaded.lm.forward(loaded.params, seq, jnp.ones_like(seq)))[0]
            np.testing.assert_allclose(h_xy[p, j], h[-1], rtol=0, atol=2e-4 * np.abs(h[-1]).max())
            np.testing.assert_allclose(h_x[p], h[-2], rtol=0, atol=2e-4 * np.abs(h[-2]).max())
