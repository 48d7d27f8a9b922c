"""TEST SUPPORT: Llama checkpoints built at test time (nothing is downloaded).

Why real random weights rather than vLLM's ``load_format="dummy"``: dummy weights are
uniform in +-1e-3, which makes the logits almost constant, so every prompt yields
the same greedy tokens and "same output" would prove nothing about the KV it was
computed from. Here every weight matrix is uniform with unit-variance scale
(``sqrt(3 / fan_in)``) from a fixed seed and every norm weight is 1, so the greedy
tokens depend on the whole prompt, and two engines given the same directory
compute the same KV and the same tokens. vLLM's CPU attention backend needs a
supported head size (32, 64, 80, ...): ``hidden_size / num_attention_heads``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

#: The tiny model of the functional tests: head_dim 32, 2 layers, vocab 1000.
TINY = {"hidden_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2}
#: A model whose KV means something else (3 layers): its fingerprint differs from TINY's.
TINY_OTHER = {"hidden_size": 128, "num_attention_heads": 4, "num_hidden_layers": 3}
#: The model of the TTFT benchmark: enough compute that prefill dominates a request.
BENCH = {"hidden_size": 1024, "num_attention_heads": 8, "num_hidden_layers": 8}


def write_llama_dir(path: Path, *, max_len: int = 4096, seed: int = 1234, **dims: int) -> Path:
    """Write a Llama checkpoint (``config.json``, ``model.safetensors``) into ``path``.

    ``dims`` are hidden_size, num_attention_heads, num_hidden_layers (and optionally
    vocab_size). The config holds the fields ``transformers.LlamaConfig`` writes.
    """
    hidden = dims["hidden_size"]
    heads = dims["num_attention_heads"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "num_hidden_layers": dims["num_hidden_layers"],
        "vocab_size": dims.get("vocab_size", 1000),
        "max_position_embeddings": max_len,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(_weights(config, seed), str(path / "model.safetensors"))
    return path


def _weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{layer}.self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[f"{layer}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{layer}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{layer}.mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{layer}.input_layernorm.weight"] = (hidden,)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (hidden,)
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            weights[name] = torch.ones(shape)
        else:
            bound = (3.0 / shape[1]) ** 0.5
            weights[name] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
    return weights
