"""LoRA adapters in PEFT's format (dynamics.lora, docs/math.md §13): logits against transformers + PEFT, the
merged weights, PEFT's initialisation, the `lora` parameter selection, and the refusals."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require

from dynamics.errors import ConfigError, ModelError
from dynamics.lora import add_lora, load_peft_adapter, merge_lora
from dynamics.masks import trainable_mask
from dynamics.models import LM, load_hf_directory
from dynamics.rewards import ImplicitRM

torch = require("torch")
transformers = require("transformers")
peft = require("peft")

V, D = 64, 16


def _base(tmp_path):
    """A tiny random Llama (untied, GQA) saved as an HF directory; returns (torch model, directory)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=4, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    directory = tmp_path / "base"
    model.save_pretrained(str(directory))
    return model, directory


def _adapter(model, tmp_path, name="adapter", **options):
    """A PEFT LoRA adapter on `model` with random (non-zero) B factors, saved; returns (peft model, directory)."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                          lora_dropout=0.0, **options)  # fmt: skip
    pm = peft.get_peft_model(model, cfg).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    directory = tmp_path / name
    pm.save_pretrained(str(directory))
    return pm, directory


def _tokens(side="right"):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, (3, 9)).astype(np.int32)
    mask = np.ones((3, 9), np.int32)
    if side == "right":
        mask[1, 6:] = 0
    else:
        mask[1, :3] = 0
    return tokens, mask


@pytest.mark.parametrize(
    ("rslora", "side"), [(False, "right"), (True, "left"), pytest.param(False, "left", marks=pytest.mark.slow)]
)
def test_adapter_logits_match_peft_and_the_merged_weights(tmp_path, rslora, side):
    model, base_dir = _base(tmp_path)
    pm, adapter_dir = _adapter(model, tmp_path, use_rslora=rslora)
    config, params = load_hf_directory(str(base_dir))
    lm, p = load_peft_adapter(LM(config), params, str(adapter_dir))
    assert lm.config.lora_rank == 4 and lm.config.lora_scale == pytest.approx(8 / (2 if rslora else 4))
    tokens, mask = _tokens(side)
    ours = np.asarray(lm.logits(p, jnp.asarray(tokens), jnp.asarray(mask)))
    with torch.no_grad():
        ref = pm(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                 attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits.numpy()  # fmt: skip
    real = mask.astype(bool)
    assert np.abs(ours - ref)[real].max() <= 1e-4
    # the adapter moves the logits by far more than the tolerance
    base = np.asarray(LM(config).logits(params, jnp.asarray(tokens), jnp.asarray(mask)))
    assert np.abs(ours - base)[real].max() > 1e-2
    # merged weights (ours), and PEFT's merge_and_unload saved and loaded: the same function
    lm_m, p_m = merge_lora(lm, p)
    merged = np.asarray(lm_m.logits(p_m, jnp.asarray(tokens), jnp.asarray(mask)))
    assert np.abs(merged - ours)[real].max() <= 1e-4
    pm.merge_and_unload().save_pretrained(str(tmp_path / "merged"))
    config_m, params_m = load_hf_directory(str(tmp_path / "merged"))
    theirs = np.asarray(LM(config_m).logits(params_m, jnp.asarray(tokens), jnp.asarray(mask)))
    assert np.abs(theirs - ours)[real].max() <= 1e-4


def test_adapter_equals_merged_weights_in_float64(tmp_path, x64):
    model, base_dir = _base(tmp_path)
    _, adapter_dir = _adapter(model, tmp_path)
    config, params = load_hf_directory(str(base_dir), dtype="float64")
    lm, p = load_peft_adapter(LM(config), params, str(adapter_dir))
    lm_m, p_m = merge_lora(lm, p)
    tokens, mask = _tokens()
    a = np.asarray(lm.logits(p, jnp.asarray(tokens), jnp.asarray(mask)))
    b = np.asarray(lm_m.logits(p_m, jnp.asarray(tokens), jnp.asarray(mask)))
    assert np.abs(a - b)[mask.astype(bool)].max() <= 1e-10 * np.abs(a).max()


def test_fresh_factors_are_initialised_as_peft_does():
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=4)  # fmt: skip
    from dynamics.models import config_from_hf

    lm = LM(config_from_hf(config.to_dict()))
    params = lm.init(jax.random.PRNGKey(0))
    lm2, p2 = add_lora(lm, params, rank=8, alpha=16, targets=["q", "down"], seed=3)
    q, down = p2["layers_0"]["attn"]["q"], p2["layers_0"]["mlp"]["down"]
    assert q["lora_a"].shape == (D, 8) and q["lora_b"].shape == (8, 4, 4)
    assert not np.asarray(q["lora_b"]).any() and not np.asarray(down["lora_b"]).any()
    for a, fan_in in ((q["lora_a"], D), (down["lora_a"], 24)):  # U(−1/√fan_in, 1/√fan_in)
        a = np.asarray(a)
        assert np.abs(a).max() <= 1 / np.sqrt(fan_in) and np.abs(a).max() > 0.8 / np.sqrt(fan_in)
    tokens = jnp.asarray(np.arange(12).reshape(2, 6) % V)
    ones = jnp.ones((2, 6), jnp.int32)
    np.testing.assert_allclose(lm2.logits(p2, tokens, ones), lm.logits(params, tokens, ones), atol=1e-6)
    # the `lora` selection: exactly the factors
    rm = ImplicitRM(lm2)
    mask = trainable_mask(rm, rm.init(p2), "lora")
    chosen = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(mask) if v]
    assert len(chosen) == 4 and all(c.endswith(("['lora_a']", "['lora_b']")) for c in chosen)
    with pytest.raises(ConfigError, match="no LoRA factors"):
        trainable_mask(ImplicitRM(lm), ImplicitRM(lm).init(params), "lora")


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_bad_adapters_are_refused(tmp_path):
    model, base_dir = _base(tmp_path)
    _, adapter_dir = _adapter(model, tmp_path)
    config, params = load_hf_directory(str(base_dir))
    for change, match in (({"use_dora": True}, "use_dora = True: DoRA adapters are not supported"),
                          ({"target_modules": ["q_proj", "lm_head"]}, r"\['lm_head'\] are not supported"),
                          ({"bias": "all"}, "bias = 'all'"),
                          ({"target_modules": ".*proj"}, "a regular expression is not supported")):  # fmt: skip
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        shutil.copytree(adapter_dir, bad)
        _edit_config(bad, **change)
        with pytest.raises(ModelError, match=match) as err:
            load_peft_adapter(LM(config), params, str(bad))
        assert "adapter_config.json" in str(err.value)
    # an adapter of another base: rank-4 factors for a wider model
    wide = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=False))  # fmt: skip
    _, other = _adapter(wide, tmp_path, name="other")
    with pytest.raises(
        ModelError,
        match=r"adapter_model.safetensors: '.*lora_[AB].weight' has shape \(\d+, \d+\); this base model's .* needs",
    ):
        load_peft_adapter(LM(config), params, str(other))


def test_the_cli_reads_an_adapter_and_trains_its_factors(tmp_path, capsys):
    """`rmdyn delta --model BASE --adapter DIR --params lora`: the IM-RM is β (ln π_adapter − ln π_base), as
    transformers + PEFT compute it with the adapter on and off; only the factors train."""
    from _tiny_hf import tiny_hf_dir

    from experiments import cli

    base_dir = tiny_hf_dir(tmp_path / "tiny")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    pm, adapter_dir = _adapter(model, tmp_path)
    out = tmp_path / "delta"
    argv = ["delta", "--model", base_dir, "--adapter", adapter_dir, "--params", "lora", "--beta", "0.5",
            "--prompt", "Is the sky blue?", "--chosen", "Yes.", "--rejected", "No.", "--pair", "Hi?", "Hello.",
            "--out", out]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0
    data = json.loads((out / "delta.json").read_text())
    assert data["model"]["adapter"] is not None
    im, ex = data["results"]["IM-RM"], data["results"]["EX-RM"]
    # r (in + out) per adapted projection: q 16→16, v 16→8, o 16→16, up 16→24, down 24→16; two blocks
    n_factors = 2 * 4 * ((16 + 16) + (16 + 8) + (16 + 16) + (16 + 24) + (24 + 16))
    assert im["meta"]["n_trained"] == n_factors and ex["meta"]["n_trained"] == n_factors + 16

    from dynamics.datasets import PreferenceRow
    from dynamics.loading import load
    from experiments.studies import one_step

    train = one_step.encode_triples(load(str(base_dir)), [PreferenceRow("Is the sky blue?", "Yes.", "No.", 0, "f", 1)])

    def logprob(batch, adapter_on: bool):
        tokens = torch.as_tensor(np.asarray(batch.tokens), dtype=torch.long)
        mask = torch.as_tensor(np.asarray(batch.attention_mask), dtype=torch.long)
        with torch.no_grad():
            if adapter_on:
                logits = pm(input_ids=tokens, attention_mask=mask).logits
            else:
                with pm.disable_adapter():
                    logits = pm(input_ids=tokens, attention_mask=mask).logits
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0].numpy()
        return (lp * np.asarray(batch.response_mask)[:, 1:]).sum(1)

    for side, batch in (("train_chosen_reward", train.chosen), ("train_rejected_reward", train.rejected)):
        expected = 0.5 * (logprob(batch, True) - logprob(batch, False))
        assert abs(expected[0]) > 1e-2
        np.testing.assert_allclose(im[side], expected, rtol=1e-3, atol=1e-4)


def test_the_trainer_adds_fresh_factors_and_trains_only_them():
    """TrainConfig(lora_rank=2, params="lora"): PEFT-initialised factors are added; after training, every base
    weight is unchanged, the B factors moved, and the IM-RM at the start ties (π = π_ref, B = 0)."""
    from test_train import preference_data, tiny_lm

    from dynamics.training import EvalSuite, TrainConfig, build_reward_model, train

    lm, params = tiny_lm()
    data = preference_data(8, 1)
    config = TrainConfig(reward="im", params="lora", lora_rank=2, lora_alpha=4.0, lora_targets=("q", "up"),
                         optimizer="sgd", lr=0.5, epochs=1, batch_size=4, micro_batch_size=4, bucket=4)  # fmt: skip
    result = train(config, lm, params, data, EvalSuite.from_preferences({"train": data}), progress=False)
    start = [h for h in result.history if h["event"] == "eval"][0]
    assert start["train/rewards/ties"] == 1.0
    rm, initial, spec = build_reward_model(config, lm, params)
    assert rm.lm.config.lora_rank == 2 and rm.lm.config.lora_scale == 2.0 and spec == "lora"
    before = dict(jax.tree_util.tree_leaves_with_path(initial["lm"]))
    after = dict(jax.tree_util.tree_leaves_with_path(result.params["lm"]))
    assert before.keys() == after.keys()
    moved = [jax.tree_util.keystr(k) for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))]
    assert moved and all(m.endswith(("['lora_a']", "['lora_b']")) for m in moved)
    assert any(m.endswith("['lora_b']") for m in moved)
