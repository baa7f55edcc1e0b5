"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers' PyTorch model on the same file.

Both sides dequantize the GGUF themselves; the weights are compared bit for bit. Logit parity is checked exactly in
float64 (with transformers' RMSNorm and RoPE kept in float64: in a float64 model they compute in float32), and in
float32 against the float32 noise floor: this model has massive activations (residual values ≈ 2.6e4), so two
correct float32 implementations differ by about as much as each differs from exact arithmetic.
"""

from __future__ import annotations

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require

torch = require("torch", reason="the parity tests need the PyTorch reference (pip install -e '.[test]')")
transformers = require("transformers")

from dynamics.datasets import load_persona  # noqa: E402
from dynamics.loading import load  # noqa: E402
from dynamics.models import cast_params, default_model_path  # noqa: E402
from dynamics.models.gguf_loader import gguf_hf_config, gguf_state_dict, open_gguf  # noqa: E402
from dynamics.rewards import ExplicitRM, ImplicitRM  # noqa: E402
from dynamics.text import encode_pairs  # noqa: E402
from experiments.studies.bundled import bundled_data_path  # noqa: E402

RESPONSES = [
    "A truthful reply is yes",
    "Considering the statement, I say no",
    "My response would be certainly",
    "I lean toward nope",
]


@pytest.fixture(scope="module")
def ours():
    return load()


@pytest.fixture(scope="module")
def reference():
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def persona_pairs():
    rows = load_persona(bundled_data_path("persona/agreeableness.jsonl"))[:8]
    prompts = [r.prompt for r in rows]
    responses = [RESPONSES[i % 4] for i in range(8)]
    return prompts, responses


def _encode(ours, pairs, side):
    return encode_pairs(ours.tokenizer, *pairs, max_length=ours.lm.config.max_position, padding_side=side)


def _torch_logits(model, batch):
    tokens, mask = np.asarray(batch.tokens), np.asarray(batch.attention_mask)
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(pos, dtype=torch.long),
        )
    return out.logits.double().numpy()


def _float64_reference(model, theta: float):
    """A float64 copy whose RMSNorm and RoPE stay in float64 (transformers computes both in float32)."""
    import copy

    m = copy.deepcopy(model).double()

    def norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rope(self, x, position_ids):
        freqs = position_ids[:, :, None].double() * self.inv_freq64[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    for mod in m.modules():
        if type(mod).__name__ == "LlamaRMSNorm":
            mod.forward = types.MethodType(norm, mod)
    rot = m.model.rotary_emb
    dim = (
        m.config.head_dim
        if getattr(m.config, "head_dim", None)
        else m.config.hidden_size // m.config.num_attention_heads
    )
    rot.inv_freq64 = torch.tensor(1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    rot.forward = types.MethodType(rope, rot)
    return m


def test_dequantized_weights_are_identical(reference):
    path = default_model_path()
    reader = open_gguf(path)
    ours = gguf_state_dict(reader, gguf_hf_config(reader, path), path)
    theirs = reference.state_dict()
    assert set(ours) <= set(theirs)
    for name, w in ours.items():
        np.testing.assert_array_equal(w, theirs[name].numpy(), err_msg=name)


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_float64_exact_parity(ours, reference, persona_pairs, x64, side):
    batch = _encode(ours, persona_pairs, side)
    assert (np.asarray(batch.attention_mask) == 0).any(), "the batch must contain padding"
    ref64 = _torch_logits(_float64_reference(reference, ours.lm.config.rope_theta), batch)
    p64 = cast_params(ours.params, jnp.float64)
    mine = np.asarray(jax.jit(ours.lm.logits)(p64, jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask)))
    real = np.asarray(batch.attention_mask).astype(bool)
    assert np.abs(mine - ref64)[real].max() <= 1e-9


def test_logits_float32_within_float32_noise(ours, reference, persona_pairs, x64):
    """float32 logits are as accurate as transformers' float32 logits, measured against exact arithmetic.

    The issue's literal bar (max |Δlogit| ≤ 1e-4 between the two float32 models) sits at this model's float32
    noise floor: transformers' own float32 logits are ≈ 9e-5 from exact arithmetic on this batch, so two correct
    float32 implementations can differ by more than 1e-4. What is asserted: ours is in the same accuracy class as
    the reference, over all logits (RMS error at most 1.5× torch's: an average over ≈ 3e7 numbers, stable) and at
    the worst logit (at most 2× torch's: one number, so a looser factor); exactness itself is
    `test_logits_float64_exact_parity`.

    Why the bounds hold on every x86-64 CPU: the error is float32 rounding in the residual stream (values up to
    ≈ 2.6e4) and, above all, in the accumulation of the projections' dot products. Both sides run those in blocked
    FMA GEMM kernels (ours: XLA's own, as `dynamics.xla_cpu` routes them; torch: oneDNN/MKL) whose accumulation
    error is of the same size on AVX2 and on AVX-512 (`test_float32_projection_accumulates_like_torch` checks the
    kernel itself). Measured on an AVX2-only AMD EPYC: ours max 7.35e-5 / RMS 9.2e-6, torch 8.89e-5 / 1.30e-5.
    With jaxlib's default YNNPACK dots and reductions the same machine gave max 1.83e-4 / RMS 2.46e-5 (2.06× /
    1.9× torch's): that kernel choice, not the model code, was what failed there (max 1.2× on an AVX-512 CPU).
    Measured figures print with -s.
    """
    batch = _encode(ours, persona_pairs, "right")
    tokens, mask = jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask)
    real = np.asarray(batch.attention_mask).astype(bool)
    exact = np.asarray(jax.jit(ours.lm.logits)(cast_params(ours.params, jnp.float64), tokens, mask))
    with jax.enable_x64(False):  # the float32 path exactly as users run it
        mine32 = np.asarray(jax.jit(ours.lm.logits)(ours.params, jnp.asarray(tokens), jnp.asarray(mask)))
    ref32 = _torch_logits(reference, batch)
    assert mine32.dtype == np.float32
    d_ref, d_ours = (ref32 - exact)[real], (mine32 - exact)[real]
    err_ref, err_ours = np.abs(d_ref).max(), np.abs(d_ours).max()
    rms_ref, rms_ours = np.sqrt(np.mean(d_ref**2)), np.sqrt(np.mean(d_ours**2))
    diff = np.abs(mine32 - ref32)[real].max()
    print(
        f"float32: |ours − torch| = {diff:.3g}; max |torch − exact| = {err_ref:.3g}, |ours − exact| = {err_ours:.3g}; "
        f"RMS torch {rms_ref:.3g}, ours {rms_ours:.3g}"
    )
    assert rms_ours <= 1.5 * rms_ref
    assert err_ours <= 2 * err_ref


@pytest.mark.parametrize(("M", "K", "N"), [(256, 576, 1536), (256, 1536, 576)])
def test_float32_projection_accumulates_like_torch(M, K, N):
    """One projection (`layers.contract`, SmolLM2's shapes) in float32: RMS error against float64 ≤ 1.5× torch's.

    The kernel-level check behind the logits bound above: the same data through our jitted projection and through
    torch.matmul in the same process, both compared with the float64 product. XLA's own kernel measured ≈ 0.9× torch
    here; YNNPACK's stand-alone dot on an AVX2-only CPU measured 1.7–2.7×, so this test fails if `dynamics.xla_cpu`
    stops routing the dots away from it.
    """
    import os

    from dynamics.models.layers import contract
    from dynamics.xla_cpu import ACCURATE_DOT_FLAG

    assert ACCURATE_DOT_FLAG in os.environ.get("XLA_FLAGS", ""), "importing dynamics sets the flag"
    rng = np.random.default_rng(K)
    x = rng.normal(size=(M, K)).astype(np.float32)
    w = (rng.normal(size=(K, N)) / np.sqrt(K)).astype(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    with jax.enable_x64(False):
        ours32 = np.asarray(jax.jit(contract, static_argnums=2)(jnp.asarray(x), jnp.asarray(w), 1), np.float64)
    torch32 = (torch.from_numpy(x) @ torch.from_numpy(w)).double().numpy()

    def rms(a):
        return np.sqrt(np.mean((a - exact) ** 2) / np.mean(exact**2))

    print(f"[{M}, {K}] @ [{K}, {N}] float32 RMS relative error: ours {rms(ours32):.3g}, torch {rms(torch32):.3g}")
    assert rms(ours32) <= 1.5 * rms(torch32)


def test_implicit_reward_matches_transformers(ours, reference, persona_pairs):
    """r_IM = β(Σ ln π − Σ ln π_ref) against the same sums from transformers' model, in float32, ≤ 1e-4.

    π_ref must differ from π for the test to mean anything: π_ref is the model with its final norm scaled by 1.1,
    applied identically on both sides.
    """
    batch = _encode(ours, persona_pairs, "right")
    ref_params = {**ours.params, "final_norm": {"scale": ours.params["final_norm"]["scale"] * 1.1}}
    rm = ImplicitRM(ours.lm, beta=0.01)
    params = rm.init(ours.params, ref_params)
    r_ours = np.asarray(jax.jit(rm.reward)(params, batch))

    import copy

    ref_model = copy.deepcopy(reference)
    with torch.no_grad():
        ref_model.model.norm.weight.mul_(1.1)

    def seq_logprob(model):
        logits = torch.tensor(_torch_logits(model, batch))
        lp = torch.log_softmax(logits[:, :-1], -1)
        tok = torch.tensor(np.asarray(batch.tokens), dtype=torch.long)[:, 1:]
        per = lp.gather(-1, tok[..., None])[..., 0]
        return (per * torch.tensor(np.asarray(batch.response_mask))[:, 1:]).sum(-1).numpy()

    r_torch = 0.01 * (seq_logprob(reference) - seq_logprob(ref_model))
    assert np.abs(r_torch).min() > 1e-3, "π and π_ref must differ on every row"
    np.testing.assert_allclose(r_ours, r_torch, atol=1e-4, rtol=0)


def test_explicit_reward_reads_last_real_token_whatever_the_padding(ours, reference, persona_pairs):
    rm = ExplicitRM(ours.lm)
    params = rm.init(ours.params, seed=3)
    f = jax.jit(rm.reward)
    right = _encode(ours, persona_pairs, "right")
    left = _encode(ours, persona_pairs, "left")
    r_right, r_left = np.asarray(f(params, right)), np.asarray(f(params, left))
    np.testing.assert_allclose(r_left, r_right, rtol=1e-5, atol=1e-6)
    # independent: transformers' final hidden state at the last 1 of the mask, times u
    mask = np.asarray(right.attention_mask)
    with torch.no_grad():
        hs = reference(
            input_ids=torch.tensor(np.asarray(right.tokens), dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            output_hidden_states=True,
        ).hidden_states[-1]
    last = mask.sum(-1) - 1  # right padding: the official code's index
    h = hs[torch.arange(len(last)), torch.tensor(last)].double().numpy()
    expected = h @ np.asarray(params["head"]["u"], np.float64)
    np.testing.assert_allclose(r_right, expected, rtol=1e-4, atol=1e-4)
    # the last real token is the newline after <|im_end|> (docs/math.md §1)
    toks = np.asarray(right.tokens)
    assert {ours.tokenizer.token_strings([int(toks[i, j])])[0] for i, j in enumerate(last)} == {"\n"}
