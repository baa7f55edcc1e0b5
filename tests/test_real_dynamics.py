"""Prediction against reality on the default model (SmolLM2-135M-Instruct), all parameters trainable (slow).

One Persona training triple and 16 unseen paraphrase pairs (4 prompts × the paper's 4 paraphrased responses),
float32 as users run it. The learning rates are where the step moves rewards visibly while the first-order term
still dominates: EX-RM η = 3e-5 (its rewards are O(1)); IM-RM η = 1e-3 (β = 0.01 scales its rewards down).
"""

from __future__ import annotations

import numpy as np
import pytest

from dynamics.datasets import PreferenceRow, load_persona
from dynamics.loading import load
from dynamics.rewards import ExplicitRM, ImplicitRM
from dynamics.step_check import check_step
from dynamics.text import encode_pairs, encode_preferences
from experiments.studies.bundled import bundled_data_path

PARAPHRASES = [
    "My response would be certainly",
    "My response would be absolutely",
    "I lean toward not really",
    "I lean toward nope",
]


@pytest.mark.slow
@pytest.mark.parametrize("kind,lr", [("ex", 3e-5), ("im", 1e-3)])
def test_real_model_prediction_matches_real_sgd_step(kind, lr):
    loaded = load()
    tok, max_len = loaded.tokenizer, loaded.lm.config.max_position
    rows = load_persona(bundled_data_path("persona/agreeableness.jsonl"))
    triple = PreferenceRow(
        prompt=rows[0].prompt,
        chosen="A truthful reply is yes",
        rejected="Considering the statement, I say no",
        id=0,
        source="test",
        line=0,
    )
    train = encode_preferences(tok, [triple], max_length=max_len)
    prompts = [r.prompt for r in rows[:4] for _ in PARAPHRASES]
    unseen = encode_pairs(tok, prompts, PARAPHRASES * 4, max_length=max_len)
    assert unseen.batch_size >= 16
    if kind == "ex":
        rm = ExplicitRM(loaded.lm)
        params = rm.init(loaded.params, seed=0)
    else:
        rm = ImplicitRM(loaded.lm)
        params = rm.init(loaded.params)
    res = check_step(rm, params, train, unseen, lrs=[lr], params_spec="all", chunk_size=16)
    stats = res.stats()[0]
    print(kind, stats)
    assert np.abs(res.actual).max() >= 1e-4, "the step must move the rewards visibly"
    assert stats["pearson"] >= 0.99
    assert stats["sign_agreement"] >= 0.95
