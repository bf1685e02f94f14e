"""Llama weights in and out of transformers' format, with no transformers at run time.

The format is the directory ``transformers.LlamaForCausalLM.save_pretrained`` writes:
``config.json`` (a LlamaConfig) and ``model.safetensors`` (or several files named by
``model.safetensors.index.json``; hf_io.py reads and writes both). tinymeg's Llama has
transformers' parameter names, so the only differences are:

- the vocabulary is not padded: tinymeg's ``embed_tokens`` and ``lm_head`` have
  ``padded_vocab_size`` rows, the extra ones (never looked up, their logits cut off) are zeros
  on the way in and dropped on the way out;
- a tied ``lm_head.weight`` is not stored (transformers ties it to ``embed_tokens``).

transformers 5 writes rotary settings as ``rope_parameters`` (with ``rope_theta``); older
versions as ``rope_theta`` and ``rope_scaling``: both are read, the first is written. A config
field tinymeg's Llama does not compute (biases, another activation, another rope type, a head
size that is not hidden_size / heads...) is an error that names it, as is any missing, extra
or mis-shaped tensor.
"""
from __future__ import annotations

import torch

from .hf_io import check_shapes, padded_rows, read_config, read_tensors, whole_state_dict, write_pretrained
from .llama import ROPE_TYPES, Llama, LlamaConfig

ROPE_KEYS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


# ---------------------------------------------------------------- config

def _rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either generation of transformers' config."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.pop("type", "default"))
    return theta, None if kind == "default" else {"rope_type": kind, **{k: v for k, v in params.items() if k != "rope_type"}}


def config_from_hf(hf: dict, *, dropout: float = 0.0, vocab_multiple: int = 64,
                   where: str = "config.json") -> LlamaConfig:
    """tinymeg's LlamaConfig for a transformers LlamaConfig (as a dict)."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"{where} is a {hf.get('model_type')!r} config, not Llama's (model_type 'llama'): "
                         f"Llama.from_pretrained reads Llama checkpoints only (GPT-2: tm.models.GPT2Model."
                         f"from_pretrained). Load other transformers models with transformers and shard them "
                         f"with tm.plans (README: Bring your own model)")
    C, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    theta, scaling = _rope(hf)
    kind = scaling["rope_type"] if scaling else "default"
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), ("silu",)),
        "attention_bias": (hf.get("attention_bias", False), (False,)),
        "mlp_bias": (hf.get("mlp_bias", False), (False,)),
        "head_dim": (hf.get("head_dim") or C // heads, (C // heads,)),
        "pretraining_tp": (hf.get("pretraining_tp", 1), (1,)),
        "rope type": (kind, ROPE_TYPES),
    }
    for key, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise ValueError(f"{where}: {key}={value!r} is a Llama variant tinymeg's Llama does not compute "
                             f"(it supports {key} in {list(allowed)})")
    if scaling is not None and any(k not in scaling for k in ROPE_KEYS):
        raise ValueError(f"{where}: rope scaling {scaling} lacks {[k for k in ROPE_KEYS if k not in scaling]}")
    return LlamaConfig(block_size=hf.get("max_position_embeddings", 2048), vocab_size=hf.get("vocab_size", 32000),
                       n_layer=hf.get("num_hidden_layers", 32), n_head=heads,
                       n_kv_head=hf.get("num_key_value_heads") or heads, n_embd=C,
                       ffn_hidden=hf.get("intermediate_size", 11008), norm_eps=hf.get("rms_norm_eps", 1e-6),
                       rope_theta=theta, rope_scaling=scaling, tie_embeddings=hf.get("tie_word_embeddings", False),
                       dropout=dropout, vocab_multiple=vocab_multiple)


def config_to_hf(cfg: LlamaConfig) -> dict:
    """The config.json transformers.LlamaForCausalLM reads for a tinymeg LlamaConfig."""
    if cfg.n_experts:
        raise ValueError(f"this Llama has mixture-of-experts MLPs (n_experts={cfg.n_experts}), which "
                         f"transformers' LlamaForCausalLM does not have: save it with a tinymeg checkpoint")
    rope = {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_hidden_size,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps, "rope_parameters": rope,
            "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
            "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": 0.02, "use_cache": True,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "dtype": "float32"}


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama checkpoint in transformers' layout, with its shape."""
    C, H, hd = cfg.n_embd, cfg.ffn_hidden_size, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, C)}
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
                       p + "self_attn.q_proj.weight": (cfg.n_head * hd, C),
                       p + "self_attn.k_proj.weight": (cfg.kv_heads * hd, C),
                       p + "self_attn.v_proj.weight": (cfg.kv_heads * hd, C),
                       p + "self_attn.o_proj.weight": (C, cfg.n_head * hd),
                       p + "mlp.gate_proj.weight": (H, C), p + "mlp.up_proj.weight": (H, C),
                       p + "mlp.down_proj.weight": (C, H)})
    shapes["model.norm.weight"] = (C,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, C)
    return shapes


# ---------------------------------------------------------------- in

def read_state_dict(path: str, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """The directory's tensors as Llama(cfg)'s state_dict (padded, tied)."""
    tensors = read_tensors(path)
    if cfg.tie_embeddings:
        head = tensors.pop("lm_head.weight", None)  # some writers store the tied head anyway
        if head is not None and "model.embed_tokens.weight" in tensors and not torch.equal(
                head, tensors["model.embed_tokens.weight"]):
            raise ValueError(f"{path}: lm_head.weight differs from model.embed_tokens.weight, but config.json "
                             f"says tie_word_embeddings=true")
    check_shapes(path, tensors, hf_shapes(cfg), "Llama")
    sd = {k: t.float().contiguous() for k, t in tensors.items()}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in sd:
            sd[key] = padded_rows(sd[key], cfg.padded_vocab_size)
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def from_pretrained(path: str, *, dropout: float = 0.0, vocab_multiple: int = 64) -> Llama:
    hf, config_path = read_config(path)
    cfg = config_from_hf(hf, dropout=dropout, vocab_multiple=vocab_multiple, where=config_path)
    sd = read_state_dict(path, cfg)
    model = Llama(cfg)
    model.load_state_dict(sd, strict=True)
    return model


# ---------------------------------------------------------------- out

def hf_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """The model's parameters in transformers' layout, whole on every rank. Sharded (DTensor)
    parameters are gathered over their mesh: a collective, so every rank must call this."""
    cfg, out = model.config, {}
    for key, t in whole_state_dict(model).items():
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue                                 # tied to model.embed_tokens.weight
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            t = t[:cfg.vocab_size]                   # padded rows are not tokens
        out[key] = t.contiguous()
    return out


def save_pretrained(model: Llama, path: str, max_shard_mb: float | None = None) -> None:
    """Write ``path/config.json`` and the weights (hf_io.write_pretrained) for transformers'
    LlamaForCausalLM.from_pretrained. Under torch.distributed every rank calls it (sharded
    parameters are gathered) and global rank 0 writes; it returns when the files exist."""
    config = config_to_hf(model.config)
    write_pretrained(path, config, hf_state_dict(model), max_shard_mb, model.pretrained_part)
