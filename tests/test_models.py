"""Parity of our Flax decoders with transformers' PyTorch classes on tiny random configs of every family.

Each reference model is built from a config (no download), its weights perturbed so that every norm and bias
matters, then converted by the same mapping the safetensors loader uses. Logits are compared at every real
(non-pad) position of a batch with padding, on both padding sides.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require

torch = require("torch", reason="the parity tests need the PyTorch reference (pip install -e '.[test]')")
transformers = require("transformers")

from dynamics.errors import ModelError  # noqa: E402
from dynamics.models import (  # noqa: E402
    LM,
    config_from_hf,
    load_hf_directory,
    load_model,
    params_from_state_dict,
    resize_vocab,
    untie,
)

V = 97


def _tiny(family: str, **over):
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3, max_position_embeddings=64)
    if family == "llama":
        cfg = transformers.LlamaConfig(
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=500.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            tie_word_embeddings=over.pop("tie", False),
            **common,
        )
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, **common)
        cls = transformers.Qwen2ForCausalLM
    elif family == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(
            num_attention_heads=4,
            rotary_pct=0.25,
            use_parallel_residual=over.pop("parallel", True),
            tie_word_embeddings=False,
            **common,
        )
        cls = transformers.GPTNeoXForCausalLM
    elif family == "gemma2":
        cfg = transformers.Gemma2Config(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=5.0,  # small caps so that the tanh is not the identity
            final_logit_softcapping=3.0,
            sliding_window=4,  # shorter than the sequences: the window matters
            **common,
        )
        cls = transformers.Gemma2ForCausalLM
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,  # not hidden_size / heads: the per-head q/k norms have H weights
            attention_bias=over.pop("bias", False),
            **common,
        )
        cls = transformers.Qwen3ForCausalLM
    elif family == "mistral":
        cfg = transformers.MistralConfig(
            num_attention_heads=4, num_key_value_heads=2, sliding_window=4, rope_theta=500.0, **common
        )  # the window is shorter than the sequences: it matters
        cls = transformers.MistralForCausalLM
    elif family == "olmo2":
        cfg = transformers.Olmo2Config(num_attention_heads=4, num_key_value_heads=2, eos_token_id=2, **common)
        cls = transformers.Olmo2ForCausalLM
    elif family == "gemma3":
        caps = over.pop("caps", False)
        cfg = transformers.Gemma3TextConfig(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=4,  # shorter than the sequences: the window matters
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_theta=300.0,  # global layers, scaled linearly
            rope_scaling={"rope_type": "linear", "factor": 2.0},
            rope_local_base_freq=50.0,  # local layers
            final_logit_softcapping=3.0 if caps else None,  # null in Gemma 3; applied only when set
            **common,
        )
        cls = transformers.Gemma3ForCausalLM
    else:
        raise ValueError(family)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():  # make every norm scale and bias non-trivial
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def _batch(padding_side: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = [11, 7, 3, 11, 9]
    T = max(lengths)
    tokens = np.zeros((len(lengths), T), np.int64)
    mask = np.zeros((len(lengths), T), np.int64)
    for i, n in enumerate(lengths):
        ids = rng.integers(0, V, n)
        sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
        tokens[i, sl] = ids
        mask[i, sl] = 1
    return tokens, mask


def _reference_logits(model, tokens, mask):
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    return out.logits.double().numpy()


def _ours(model, dtype=jnp.float32):
    config = config_from_hf(model.config.to_dict())
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return LM(config), params_from_state_dict(config, sd, cast=lambda a: jnp.asarray(a, dtype))


FAMILIES = [
    ("llama", {}),
    ("llama", {"tie": True}),
    ("qwen2", {}),
    ("gpt_neox", {}),
    ("gpt_neox", {"parallel": False}),
    ("gemma2", {}),
    ("qwen3", {}),
    ("qwen3", {"bias": True}),
    ("mistral", {}),
    ("olmo2", {}),
    ("gemma3", {}),
    ("gemma3", {"caps": True}),
]


@pytest.mark.parametrize("family,over", FAMILIES, ids=lambda x: str(x) if isinstance(x, str) else "-")
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_logits_match_transformers_float32(family, over, padding_side):
    model = _tiny(family, **dict(over))
    lm, params = _ours(model)
    tokens, mask = _batch(padding_side)
    ref = _reference_logits(model, tokens, mask)
    ours = np.asarray(jax.jit(lm.logits)(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)))
    real = mask.astype(bool)
    diff = np.abs(ours - ref)[real].max()
    assert diff <= 1e-4, f"{family} {over}: max |Δlogit| = {diff:.3g}"
    # the comparison is not vacuous: logits vary by far more than the tolerance
    assert np.ptp(ref[real]) > 0.5


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gemma2", "qwen3", "mistral", "olmo2", "gemma3"])
def test_safetensors_directory_roundtrip(family, tmp_path):
    """save_pretrained → our loader gives the same logits as the state-dict mapping."""
    model = _tiny(family)
    model.save_pretrained(tmp_path, safe_serialization=True)
    config, params = load_hf_directory(str(tmp_path))
    lm, ref_params = _ours(model)
    assert config.family == family
    leaves_a = jax.tree.leaves(params)
    leaves_b = jax.tree.leaves(ref_params)
    assert jax.tree.structure(params) == jax.tree.structure(ref_params)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(leaves_a, leaves_b, strict=True))
    lm2, params2 = load_model(str(tmp_path))
    assert lm2.config == config
    # load_model's parameters are the state-dict mapping's, leaf for leaf, and give transformers' logits
    assert jax.tree.structure(params2) == jax.tree.structure(ref_params)
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens, mask = _batch("right")
    ours = np.asarray(lm2.logits(params2, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)))
    ref = _reference_logits(model, tokens, mask)
    real = mask.astype(bool)
    assert np.abs(ours - ref)[real].max() <= 1e-4 and np.ptp(ref[real]) > 0.5
    assert lm.config.replace(name=config.name) == config  # the state-dict mapping's config, but for its name


def test_padding_side_and_amount_do_not_change_hidden_states():
    model = _tiny("gemma2")  # sliding window + soft-caps: the most position-sensitive family
    lm, params = _ours(model)
    f = jax.jit(lm.forward)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, V, 6)
    rows = []
    for left, right in [(0, 0), (5, 0), (0, 5), (2, 3)]:
        tokens = np.concatenate([np.zeros(left), ids, np.zeros(right)]).astype(np.int32)[None]
        mask = np.concatenate([np.zeros(left), np.ones(6), np.zeros(right)]).astype(np.int32)[None]
        h = np.asarray(f(params, jnp.asarray(tokens), jnp.asarray(mask)))
        rows.append(h[0, left : left + 6])
    for r in rows[1:]:
        np.testing.assert_allclose(r, rows[0], atol=2e-6, rtol=0)


def test_unknown_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    listing = r"llama.*qwen2.*qwen3.*mistral.*olmo2.*gpt_neox.*gemma2.*gemma3_text"
    with pytest.raises(ModelError, match=r"unsupported architecture.*mamba.*" + listing):
        load_model(str(tmp_path))


def test_missing_config_and_bad_json(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_hf_directory(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama",\n oops}')
    with pytest.raises(ModelError, match="line 2"):
        load_hf_directory(str(tmp_path))


def test_missing_tensor_is_named():
    model = _tiny("qwen2")
    config = config_from_hf(model.config.to_dict())
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ModelError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        params_from_state_dict(config, sd)


def test_untie_keeps_the_function_and_separates_the_head():
    model = _tiny("llama", tie=True)
    lm, params = _ours(model)
    assert "lm_head" not in params
    lm2, params2 = untie(lm, params)
    assert not lm2.config.tie_embeddings
    tokens, mask = _batch("right")
    a = lm.logits(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32))
    b = lm2.logits(params2, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # moving the untied head leaves the hidden states exactly unchanged
    params3 = {**params2, "lm_head": {"w": params2["lm_head"]["w"] + 1.0}}
    h2 = lm2.forward(params2, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32))
    h3 = lm2.forward(params3, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32))
    np.testing.assert_array_equal(np.asarray(h2), np.asarray(h3))


def test_resize_vocab_adds_mean_rows_and_keeps_old_logits():
    model = _tiny("gpt_neox")
    lm, params = _ours(model)
    lm2, params2 = resize_vocab(lm, params, V + 2)
    assert lm2.config.vocab_size == V + 2
    np.testing.assert_allclose(
        np.asarray(params2["embed"]["embedding"][-1]),
        np.asarray(params["embed"]["embedding"]).mean(0),
        rtol=1e-6,
    )
    tokens, mask = _batch("right")
    a = lm.logits(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32))
    b = lm2.logits(params2, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32))
    np.testing.assert_allclose(np.asarray(b[..., :V]), np.asarray(a), atol=1e-6)
    with pytest.raises(ModelError, match="shrink"):
        resize_vocab(lm, params, V - 1)


def test_param_count_matches_transformers():
    for family, over in FAMILIES:
        model = _tiny(family, **dict(over))
        lm, _ = _ours(model)
        assert lm.config.n_params == sum(p.numel() for p in model.parameters()), family
