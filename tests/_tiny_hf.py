"""A tiny random Llama (d = 16, 2 blocks) with the default tokenizer, written as a Hugging Face model directory.

The end-to-end tests point every command at it (`--model DIR`, `--set model=DIR`, `models --check DIR`): loading it
takes well under a second, and a subprocess (`rmdyn experiment ... --resume` after SIGKILL) loads the same weights.
transformers reads the same directory (`rmdyn bench train --model DIR`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

D, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FF = 16, 2, 4, 2, 4, 24


@functools.cache
def tiny_hf_dir(root: Path, seed: int = 0) -> Path:
    """Writes the model into `root` (once per process and seed) and returns it: config.json, model.safetensors,
    tokenizer.

    Matrices are N(0, 0.4²) (as `--tiny`'s N(0, 0.02²)·20) drawn from `seed`, norms 1; tied embeddings.
    """
    from safetensors.numpy import save_file

    from dynamics.models import default_model_path
    from dynamics.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_path())
    V = tok.vocab_size
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (0.4 * rng.standard_normal(shape)).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": np.ones(D, np.float32)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, D),
            p + "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, D),
            p + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, D),
            p + "self_attn.o_proj.weight": w(D, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": w(FF, D),
            p + "mlp.up_proj.weight": w(FF, D),
            p + "mlp.down_proj.weight": w(D, FF),
            p + "input_layernorm.weight": np.ones(D, np.float32),
            p + "post_attention_layernorm.weight": np.ones(D, np.float32),
        }
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "intermediate_size": FF, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 1024, "tie_word_embeddings": True,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
    }  # fmt: skip
    (root / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (root / "tokenizer.json").write_text(tok._backend.to_str(), encoding="utf-8")
    special = {name: getattr(tok, name) for name in ("bos_token", "eos_token", "unk_token")}
    (root / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": tok.chat_template, "add_bos_token": tok.add_bos_token, **special}),
        encoding="utf-8",
    )
    return root


_ROWS, _WIDTH = 64, 128  # one forward shape for every recomputation here: one compilation


def hidden_states(loaded, prompts, responses) -> tuple[np.ndarray, list[list[int]]]:
    """Final hidden states of each chat-templated (prompt, response), float64 [B, 128, D], and the token ids."""
    tok = loaded.tokenizer
    ids = [
        tok.encode(
            tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}]),
            add_special_tokens=False,
        )
        for p, r in zip(prompts, responses, strict=True)
    ]
    assert max(map(len, ids)) <= _WIDTH
    forward = _jitted_forward(loaded.lm)
    out = []
    for start in range(0, len(ids), _ROWS):
        tokens = np.zeros((_ROWS, _WIDTH), np.int32)
        mask = np.zeros((_ROWS, _WIDTH), np.int32)
        for i, row in enumerate(ids[start : start + _ROWS]):
            tokens[i, : len(row)], mask[i, : len(row)] = row, 1
        out.append(np.asarray(forward(loaded.params, tokens, mask), np.float64))
    return np.concatenate(out)[: len(ids)], ids


@functools.lru_cache(maxsize=2)
def _jitted_forward(lm):
    import jax

    return jax.jit(lm.forward)


def last_hidden(loaded, prompts, responses) -> np.ndarray:
    """h at the last token of each chat-templated (prompt, response) — where the EX-RM reads — float64 [B, D]."""
    hidden, ids = hidden_states(loaded, prompts, responses)
    return hidden[np.arange(len(ids)), [len(r) - 1 for r in ids]]
