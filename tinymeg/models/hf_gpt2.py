"""GPT-2 weights in and out of the Hugging Face format, with no transformers at run time.

The format is the directory ``transformers.GPT2LMHeadModel.save_pretrained`` writes:
``config.json`` (a GPT2Config) and ``model.safetensors`` (or several files named by
``model.safetensors.index.json``). It differs from tinymeg's GPT2Model in three ways:

- ``c_attn``, ``c_proj`` and ``c_fc`` are Hugging Face ``Conv1D`` layers, whose weight is
  stored transposed, (in, out): they are transposed on the way in and out;
- the vocabulary is not padded: tinymeg's embedding has ``padded_vocab_size`` rows, the
  extra ones (never looked up, their logits cut off) are zeros on the way in and dropped on
  the way out;
- the tied ``lm_head.weight`` is not stored (transformers ties it to ``transformer.wte``).

Files that the Hub's original GPT-2 checkpoints hold besides the parameters (the causal-mask
buffers ``attn.bias``/``attn.masked_bias``, names without the ``transformer.`` prefix) are
read too. Any other missing, extra or wrong-shaped tensor is an error that names it.
"""
from __future__ import annotations

import torch

from .gpt2 import GPT2Model, GPTConfig
from .hf_io import check_shapes, padded_rows, read_config, read_tensors, whole_state_dict, write_pretrained

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")   # old checkpoints' causal masks: not parameters
GPT2_GELU = ("gelu_new", "gelu_pytorch_tanh")        # the tanh approximation, as tinymeg's bias_gelu


# ---------------------------------------------------------------- config

def config_from_hf(hf: dict, *, dropout: float | None = None, vocab_multiple: int = 64,
                   where: str = "config.json") -> GPTConfig:
    """tinymeg's GPTConfig for a transformers GPT2Config (as a dict). ``dropout`` None takes
    the config's (its three dropout rates must then agree)."""
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{where} is a {hf.get('model_type')!r} config, not GPT-2's (model_type 'gpt2'): "
                         f"GPT2Model.from_pretrained reads GPT-2 checkpoints only (a Llama: tm.models.Llama."
                         f"from_pretrained). Load other transformers "
                         f"models with transformers and shard them with tm.plans (README: Bring your own model)")
    n_embd = hf.get("n_embd", 768)
    unsupported = {
        "n_inner": (hf.get("n_inner"), (None, 4 * n_embd)),
        "activation_function": (hf.get("activation_function", "gelu_new"), GPT2_GELU),
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5), (1e-5,)),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
        "add_cross_attention": (hf.get("add_cross_attention", False), (False,)),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), (True,)),
    }
    for key, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise ValueError(f"{where}: {key}={value!r} is a GPT-2 variant tinymeg's GPT2Model does not "
                             f"compute (it supports {key} in {list(allowed)})")
    if dropout is None:
        rates = {hf.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
        if len(rates) > 1:
            raise ValueError(f"{where} has different resid/embd/attn dropout rates {sorted(rates)}; tinymeg's "
                             f"GPT-2 has one: pass dropout= to from_pretrained")
        dropout = rates.pop()
    return GPTConfig(block_size=hf.get("n_positions", 1024), vocab_size=hf.get("vocab_size", 50257),
                     n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd,
                     dropout=dropout, bias=True, vocab_multiple=vocab_multiple)


def config_to_hf(cfg: GPTConfig) -> dict:
    """The config.json transformers.GPT2LMHeadModel reads for a tinymeg GPTConfig."""
    if cfg.n_experts:
        raise ValueError(f"this model has mixture-of-experts layers (n_experts={cfg.n_experts}), which "
                         f"transformers' GPT-2 has no place for (it would load a dense config with random "
                         f"MLPs): save a checkpoint (--ckpt-dir) or export with --format torch")
    if not cfg.bias:
        raise ValueError("GPT-2's Hugging Face format has biases everywhere; this model was built with "
                         "bias=False, which transformers' GPT2LMHeadModel cannot load")
    special = 50256 if cfg.vocab_size == 50257 else None  # <|endoftext|> of GPT-2's own tokenizer
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": None, "activation_function": "gelu_new", "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "layer_norm_epsilon": 1e-5,
            "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "add_cross_attention": False, "tie_word_embeddings": True,
            "bos_token_id": special, "eos_token_id": special, "use_cache": True, "dtype": "float32"}


def hf_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a GPT-2 checkpoint in Hugging Face's layout, with its shape."""
    C, shapes = cfg.n_embd, {"transformer.wte.weight": (cfg.vocab_size, cfg.n_embd),
                             "transformer.wpe.weight": (cfg.block_size, cfg.n_embd)}
    for i in range(cfg.n_layer):
        h = f"transformer.h.{i}."
        shapes.update({h + "ln_1.weight": (C,), h + "ln_1.bias": (C,), h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
                       h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
                       h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
                       h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
                       h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,)})
    shapes.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)})
    return shapes


# ---------------------------------------------------------------- in

def _to_hf_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Hub's original checkpoints name tensors without "transformer." and keep mask buffers."""
    out = {}
    for key, t in tensors.items():
        if key.endswith(MASK_BUFFERS):
            continue
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key
        out[key] = t
    return out


def read_state_dict(path: str, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """The directory's tensors as GPT2Model(cfg)'s state_dict (transposed, padded, tied)."""
    tensors = _to_hf_names(read_tensors(path))
    head = tensors.pop("lm_head.weight", None)
    if head is not None and "transformer.wte.weight" in tensors and not torch.equal(head, tensors["transformer.wte.weight"]):
        raise ValueError(f"{path}: lm_head.weight differs from transformer.wte.weight (GPT-2 ties them)")
    check_shapes(path, tensors, hf_shapes(cfg), "GPT-2")
    sd = {k: (t.t() if k.endswith(CONV1D) else t).float().contiguous() for k, t in tensors.items()}
    sd["transformer.wte.weight"] = sd["lm_head.weight"] = padded_rows(sd["transformer.wte.weight"],
                                                                      cfg.padded_vocab_size)
    return sd


def from_pretrained(path: str, *, dropout: float | None = None, vocab_multiple: int = 64) -> GPT2Model:
    hf, config_path = read_config(path)
    cfg = config_from_hf(hf, dropout=dropout, vocab_multiple=vocab_multiple, where=config_path)
    sd = read_state_dict(path, cfg)
    model = GPT2Model(cfg)
    model.load_state_dict(sd, strict=True)
    return model


# ---------------------------------------------------------------- out

def hf_state_dict(model: GPT2Model) -> dict[str, torch.Tensor]:
    """The model's parameters in Hugging Face's layout, whole on every rank. Sharded (DTensor)
    parameters are gathered over their mesh: a collective, so every rank must call this."""
    out = {}
    for key, t in whole_state_dict(model).items():
        if key == "lm_head.weight":
            continue                                 # tied to transformer.wte.weight
        if key == "transformer.wte.weight":
            t = t[:model.config.vocab_size]          # padded rows are not tokens
        out[key] = (t.t() if key.endswith(CONV1D) else t).contiguous()
    return out


def save_pretrained(model: GPT2Model, path: str, max_shard_mb: float | None = None) -> None:
    """Write ``path/config.json`` and the weights (hf_io.write_pretrained) for transformers'
    GPT2LMHeadModel.from_pretrained. Under torch.distributed every rank calls it (sharded
    parameters are gathered) and global rank 0 writes; it returns when the files exist."""
    write_pretrained(path, config_to_hf(model.config), hf_state_dict(model), max_shard_mb, model.pretrained_part)
