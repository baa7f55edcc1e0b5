"""Qwen3, Mistral, OLMo 2 and Gemma 3 against transformers: exact float64 parity, the features that set them apart
(sliding windows shorter than the sequences, Gemma 3's local and global RoPE), config reading, the options that
are refused, and GGUF loading (Qwen3, OLMo 2) or its refusal (Gemma 3).

float32 parity and the safetensors round trip of these families are parametrizations of tests/test_models.py,
whose tiny random configs (`_tiny`), padded batches (`_batch`), loading (`_ours`) and family list are reused here.
"""

from __future__ import annotations

import copy
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require

torch = require("torch", reason="the parity tests need the PyTorch reference (pip install -e '.[test]')")
transformers = require("transformers")

from test_models import FAMILIES, V, _batch, _ours, _reference_logits, _tiny  # noqa: E402

from dynamics.errors import ModelError  # noqa: E402
from dynamics.models import LM, config_from_hf, load_gguf, load_hf_directory  # noqa: E402

NEW_FAMILIES = [(family, over) for family, over in FAMILIES if family in ("qwen3", "mistral", "olmo2", "gemma3")]


def _logits(lm, params, tokens, mask):
    return np.asarray(jax.jit(lm.logits)(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)))


def _inv_freq64(config, layer_type):
    """transformers' RoPE inverse frequencies of `layer_type`, computed in float64 from its own config."""
    rp = config.rope_parameters
    rp = rp[layer_type] if layer_type is not None else rp
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv = 1.0 / rp["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    assert rp.get("rope_type", "default") in ("default", "linear")
    return inv / rp["factor"] if rp.get("rope_type") == "linear" else inv


def _float64_reference(model):
    """A float64 copy computed in float64 throughout.

    In a float64 model transformers still computes RMSNorm, the RoPE angles and (eager) softmax in float32, and
    Gemma's √D embedding scale is a float32 number: the norms and RoPE are replaced by float64 versions of the
    same formulas, the scale by its float64 value, and attention runs through SDPA (float64 on CPU).
    """
    m = copy.deepcopy(model).double()
    m.config._attn_implementation = "sdpa"
    for mod in m.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
            plus_one = type(mod).__name__.startswith("Gemma")

            def norm(x, mod=mod, eps=eps, plus_one=plus_one):
                y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
                return y * ((1.0 + mod.weight) if plus_one else mod.weight)

            mod.forward = norm
    rot, config = m.model.rotary_emb, m.config

    def rope(x, position_ids, layer_type=None):
        inv = torch.tensor(_inv_freq64(config, layer_type))
        freqs = position_ids[:, :, None].double() * inv[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    rot.forward = rope
    embed = m.model.embed_tokens
    if hasattr(embed, "embed_scale"):
        embed.embed_scale = torch.tensor(config.hidden_size**0.5, dtype=torch.float64)
    return m


@pytest.mark.parametrize("family,over", NEW_FAMILIES, ids=lambda x: str(x) if isinstance(x, str) else "-")
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_logits_match_transformers_float64(family, over, padding_side, x64):
    model = _tiny(family, **dict(over))
    lm, params = _ours(model, jnp.float64)
    tokens, mask = _batch(padding_side)
    ref = _reference_logits(_float64_reference(model), tokens, mask)
    ours = _logits(lm, params, tokens, mask)
    assert ours.dtype == np.float64
    real = mask.astype(bool)
    diff = np.abs(ours - ref)[real].max()
    assert diff <= 1e-10, f"{family} {over}: max |Δlogit| = {diff:.3g}"
    assert np.ptp(ref[real]) > 0.5


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_sliding_window_is_shorter_than_the_sequences_and_matters(family):
    """The tiny configs' window (4) is shorter than the batch (11 tokens): without it the logits are far off."""
    model = _tiny(family)
    lm, params = _ours(model)
    tokens, mask = _batch("left")
    assert lm.config.sliding_window is not None and lm.config.sliding_window < mask.sum(-1).max()
    assert "sliding" in lm.config.layer_types
    if family == "gemma3":
        assert set(lm.config.layer_types) == {"sliding", "full"}
    else:
        assert set(lm.config.layer_types) == {"sliding"}  # Mistral: every layer
    ref = _reference_logits(model, tokens, mask)
    real = mask.astype(bool)
    assert np.abs(_logits(lm, params, tokens, mask) - ref)[real].max() <= 1e-4
    unwindowed = LM(lm.config.replace(sliding_window=None))
    assert np.abs(_logits(unwindowed, params, tokens, mask) - ref)[real].max() > 1e-2


def test_gemma3_local_and_global_rope_differ_and_matter():
    model = _tiny("gemma3")
    lm, params = _ours(model)
    c = lm.config
    assert (c.rope_theta, c.rope_local_theta) == (300.0, 50.0)
    assert dict(c.rope_scaling) == {"rope_type": "linear", "factor": 2.0}
    assert c.query_scale == 24**-0.5 and c.attn_logit_softcap is None and c.final_logit_softcap is None
    tokens, mask = _batch("right")
    ref = _reference_logits(model, tokens, mask)
    real = mask.astype(bool)
    for wrong in (c.replace(rope_local_theta=None), c.replace(rope_scaling=None)):
        assert np.abs(_logits(LM(wrong), params, tokens, mask) - ref)[real].max() > 1e-3


@pytest.mark.parametrize("family", ["mistral", "gemma3", "olmo2"])
def test_padding_does_not_change_hidden_states(family):
    model = _tiny(family)
    lm, params = _ours(model)
    f = jax.jit(lm.forward)
    ids = np.random.default_rng(3).integers(0, V, 6)
    rows = []
    for left, right in [(0, 0), (5, 0), (0, 5), (2, 3)]:
        tokens = np.concatenate([np.zeros(left), ids, np.zeros(right)]).astype(np.int32)[None]
        mask = np.concatenate([np.zeros(left), np.ones(6), np.zeros(right)]).astype(np.int32)[None]
        rows.append(np.asarray(f(params, jnp.asarray(tokens), jnp.asarray(mask)))[0, left : left + 6])
    for r in rows[1:]:
        np.testing.assert_allclose(r, rows[0], atol=2e-6, rtol=0)


def test_gemma3_old_style_rope_keys_read_like_the_new_ones():
    """config.json files on the Hub carry rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern;
    transformers ≥ 5 writes rope_parameters per layer type and layer_types. Both read to the same config."""
    new = _tiny("gemma3").config.to_dict()
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old |= {
        "rope_theta": 300.0,
        "rope_local_base_freq": 50.0,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        "sliding_window_pattern": 2,  # layers 0 and 2 sliding, layer 1 full, as the tiny config's layer_types
    }
    assert config_from_hf(old) == config_from_hf(new)
    default = config_from_hf({**old, "num_hidden_layers": 12, "sliding_window_pattern": None})
    assert default.layer_types == ("sliding",) * 5 + ("full",) + ("sliding",) * 5 + ("full",)


def _edit(hf: dict, family: str, option: str) -> None:
    """Set one unsupported option in a saved config.json dict."""
    if option == "yarn":
        if family == "gemma3":
            hf.pop("rope_parameters")
            hf["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
        else:
            hf["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0}
    elif option == "local_scaling":
        hf["rope_parameters"]["sliding_attention"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 50.0}
    elif option == "layer_types":
        hf["layer_types"] = ["sliding_attention", "chunked_attention", "full_attention"]
    else:
        hf[option] = {"hidden_act": "gelu", "attn_logit_softcapping": 50.0}.get(option, True)


UNSUPPORTED = [
    ("gemma3", "yarn", "rope_scaling"),
    ("gemma3", "local_scaling", "rope_parameters"),
    ("gemma3", "attn_logit_softcapping", "attn_logit_softcapping"),
    ("gemma3", "use_bidirectional_attention", "use_bidirectional_attention"),
    ("gemma3", "layer_types", "layer_types"),
    ("mistral", "yarn", "rope_parameters"),
    ("qwen3", "use_sliding_window", "use_sliding_window"),
    ("olmo2", "hidden_act", "hidden_act"),
]


@pytest.mark.parametrize("family,option,key", UNSUPPORTED)
def test_unsupported_option_names_the_file_and_the_key(family, option, key, tmp_path):
    _tiny(family).save_pretrained(tmp_path, safe_serialization=True)
    path = tmp_path / "config.json"
    hf = json.loads(path.read_text())
    _edit(hf, family, option)
    path.write_text(json.dumps(hf))
    with pytest.raises(ModelError, match=rf"^{re.escape(str(path))}: .*'{key}'") as err:
        load_hf_directory(str(tmp_path))
    assert "--" not in str(err.value).replace(str(path), "")  # a library error names no command-line flag


def _write_gguf(path, arch: str, model, *, extra=None) -> None:
    """`model` as a float32 GGUF of architecture `arch`, tensor names from gguf's own transformers → GGUF map."""
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    if getattr(c, "head_dim", None):
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    for key, value in (extra or {}).items():
        getattr(writer, key)(value)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        writer.add_tensor(name, tensor.detach().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family", ["qwen3", "olmo2"])
def test_gguf_of_the_family_matches_transformers(family, tmp_path):
    model = _tiny(family)
    path = tmp_path / f"{family}.gguf"
    _write_gguf(path, family, model)
    config, params = load_gguf(str(path))
    assert config.family == family and not config.tie_embeddings
    assert config.head_dim == (16 if family == "qwen3" else 32 // 4)  # Qwen3's head_dim key; OLMo 2: D / N
    tokens, mask = _batch("left")
    ref = _reference_logits(model, tokens, mask)
    real = mask.astype(bool)
    assert np.abs(_logits(LM(config), params, tokens, mask) - ref)[real].max() <= 1e-4


def test_gguf_refusals_say_why(tmp_path):
    """Gemma 3 (metadata lacks query_pre_attn_scalar, layer_types), OLMo 3 (a sliding window) and RoPE scaling."""
    import gguf

    path = tmp_path / "gemma3.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((V, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match=r"'gemma3' is not supported for GGUF loading: .*query_pre_attn_scalar"):
        load_gguf(str(path))
    model = _tiny("olmo2")
    _write_gguf(tmp_path / "olmo3.gguf", "olmo2", model, extra={"add_sliding_window": 4})
    with pytest.raises(ModelError, match=r"olmo2\.attention\.sliding_window is set \(an OLMo 3 model\)"):
        load_gguf(str(tmp_path / "olmo3.gguf"))
    yarn = {"add_rope_scaling_type": gguf.RopeScalingType.YARN}
    _write_gguf(tmp_path / "yarn.gguf", "qwen3", _tiny("qwen3"), extra=yarn)
    with pytest.raises(ModelError, match=r"qwen3\.rope\.scaling\.type is 'yarn': not supported"):
        load_gguf(str(tmp_path / "yarn.gguf"))
