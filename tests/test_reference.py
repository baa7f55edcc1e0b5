"""A DPO run's policy with its own reference (`--model POLICY --ref REF`, `Loaded.with_reference`): the IM-RM
rewards against transformers' log-probabilities of the two checkpoints, and the refusals of a reference that does
not fit the policy."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from _tiny_hf import tiny_hf_dir
from conftest import require

from experiments import cli

PROMPT, CHOSEN, REJECTED = "Is the sky blue?", "Yes, it is blue.", "No."
PAIR = ("Is grass green?", "Yes, mostly.")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy_ref")
    return tiny_hf_dir(root / "policy", seed=1), tiny_hf_dir(root / "ref", seed=0)


def _torch_logprob(directory, batch) -> np.ndarray:
    """Σ over response tokens of ln π(y_k | x, y<k), by transformers in float64 (an independent forward)."""
    torch = require("torch")
    transformers = require("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float64).eval()
    tokens = torch.as_tensor(np.asarray(batch.tokens), dtype=torch.long)
    mask = torch.as_tensor(np.asarray(batch.attention_mask), dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=tokens, attention_mask=mask).logits
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None])[..., 0].numpy()
    return (lp * np.asarray(batch.response_mask)[:, 1:]).sum(axis=1)


def test_im_rewards_are_beta_times_policy_minus_reference_logprobs(dirs, tmp_path, capsys):
    policy, ref = dirs
    out = tmp_path / "delta"
    argv = ["delta", "--model", policy, "--ref", ref, "--reward", "im", "--beta", "0.5", "--prompt", PROMPT,
            "--chosen", CHOSEN, "--rejected", REJECTED, "--pair", *PAIR, "--out", out]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0
    data = json.loads((out / "delta.json").read_text())
    assert data["model"]["reference"] is not None
    result = data["results"]["IM-RM"]

    from dynamics.datasets import PreferenceRow, UnseenPair
    from dynamics.loading import load
    from experiments.studies import one_step

    loaded = load(str(policy))
    train, unseen = one_step.encode(
        loaded, [PreferenceRow(PROMPT, CHOSEN, REJECTED, 0, "flags", None)], [UnseenPair(*PAIR, None, "--pair", 1)]
    )
    expected = {
        side: 0.5 * (_torch_logprob(policy, batch) - _torch_logprob(ref, batch))
        for side, batch in (("train_chosen_reward", train.chosen), ("train_rejected_reward", train.rejected))
    }
    for side, value in expected.items():
        assert abs(value[0]) > 1e-2  # the policy is not its reference
        np.testing.assert_allclose(result[side], value, rtol=1e-4, atol=1e-5)
    unseen_r = 0.5 * (_torch_logprob(policy, unseen) - _torch_logprob(ref, unseen))
    np.testing.assert_allclose(result["reward_before"], unseen_r, rtol=1e-4, atol=1e-5)


def test_a_reference_of_another_architecture_or_tokenizer_is_refused(dirs, tmp_path, capsys):
    policy, ref = dirs
    other = tmp_path / "other_arch"
    shutil.copytree(ref, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (other / "config.json").write_text(json.dumps(config))
    assert cli.main(["delta", "--model", str(policy), "--ref", str(other), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"--ref {other}: reference {other}" in err and "architecture differs" in err and "norm_eps=0.001" in err

    retok = tmp_path / "other_tokenizer"
    shutil.copytree(ref, retok)
    tok = json.loads((retok / "tokenizer_config.json").read_text())
    tok["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (retok / "tokenizer_config.json").write_text(json.dumps(tok))
    assert cli.main(["delta", "--model", str(policy), "--ref", str(retok), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert f"--ref {retok}" in err and "tokenizer differs" in err


def test_a_sequence_classification_checkpoint_loads_with_its_score_head(dirs, tmp_path):
    """A reward model saved as transformers' LlamaForSequenceClassification (what TRL's RewardTrainer writes): rmdyn's
    EX-RM rewards equal the checkpoint's scores (logits of its one label)."""
    torch = require("torch")
    transformers = require("transformers")
    _, base = dirs
    out = tmp_path / "reward_model"
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, out / name)

    from dynamics.datasets import UnseenPair
    from dynamics.loading import load
    from experiments.studies import one_step

    loaded = load(str(out))
    assert loaded.score_head is not None and loaded.describe()["score_head"]
    rm, params = one_step.reward_model("ex", loaded, seed=5)
    np.testing.assert_array_equal(np.asarray(params["head"]["u"]), model.score.weight.detach().numpy()[0])
    pairs = [UnseenPair(p, r, None, "--pair", i + 1) for i, (p, r) in enumerate([PAIR, (PROMPT, CHOSEN)])]
    batch = one_step.encode_unseen(loaded, pairs)
    ours = np.asarray(rm.reward(params, batch))
    model.eval()
    for i in range(len(pairs)):  # one unpadded row at a time: the checkpoint's own last-token rule needs no pad id
        n = int(np.asarray(batch.attention_mask)[i].sum())
        ids = torch.as_tensor(np.asarray(batch.tokens)[i : i + 1, :n], dtype=torch.long)
        with torch.no_grad():
            score = float(model(input_ids=ids).logits[0, 0])
        assert abs(score) > 1e-3
        assert ours[i] == pytest.approx(score, rel=1e-4, abs=1e-5)


def test_a_score_head_with_several_labels_is_refused(dirs, tmp_path):
    transformers = require("transformers")
    _, base = dirs
    out = tmp_path / "three_labels"
    transformers.AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=3).save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, out / name)
    from dynamics.errors import ModelError
    from dynamics.loading import load

    with pytest.raises(ModelError, match=r"score.weight has shape \(3, 16\); a reward head is \[1, d_model = 16\]"):
        load(str(out))
