"""A transformers decoder (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM``) in
tinymeg's CausalLM protocol, so that pipeline and context parallelism split it as they split
tinymeg's own models (tinymeg/models/base.py).

``tm.models.from_transformers(hf_model)`` returns a ``TransformersCausalLM`` that shares the model's
modules: the same parameters under the same names (``model.layers.0.self_attn.q_proj.weight``,
``lm_head.weight``: transformers' state_dict keys), a tied head staying tied. It names the parts
(``model.embed_tokens``, ``model.layers``, ``model.norm``, ``lm_head``) and computes tinymeg's
forward: ``model(idx, targets)`` -> (logits, mean cross-entropy of ``targets``, which are already
shifted, -1 ignored): ``hf_model(input_ids=idx).logits`` and the loss transformers computes from
``labels``, with the training path's fused loss (``return_logits=False``) and tinymeg's TP plan
(``tinymeg-llama``: the same module names; loss parallel works, as the loss is tinymeg's).

- **Positions.** Every decoder layer gets the rotary cos and sin of the positions it is given
  (``block_args(pos)``: the model's own rotary module on ``position_ids = pos``, with its scaling),
  so context parallelism's layout positions and a pipeline stage's reach every layer.
- **Attention** goes through transformers' attention interface (``AttentionInterface``, the hook
  transformers offers for custom kernels): the adapter registers a ``"tinymeg"`` implementation and
  switches the model to it. It repeats grouped key/value heads and calls the layer's
  ``core_attention``, a ``tinymeg.models.CausalAttention`` added to each attention module (no
  parameters), which context parallelism swaps for ring attention, as in tinymeg's models.
- **Sliding windows** (Mistral's, Qwen2's ``use_sliding_window``): tinymeg's attention is causal
  over the whole sequence, which equals a sliding window's as long as the sequence fits in it, so
  the adapter's ``block_size`` (the longest sequence every dim accepts, checked on every rank
  before any communication) is the smallest window, or ``max_position_embeddings``.
- **Refused**, each with an error naming it: a model without ``model.embed_tokens``,
  ``model.layers``, ``model.norm``, ``model.rotary_emb`` and ``lm_head``; attention scaled other
  than by 1/sqrt(head_dim). Attention masks (padding) are not taken: sequences are packed.

transformers is not imported by tinymeg: only this adapter touches it, when given such a model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .base import CausalAttention, CausalLM

ATTENTION = "tinymeg"   # the name of tinymeg's implementation in transformers' AttentionInterface
PARTS = ("model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head")


@dataclass
class TransformersConfig:
    """What tinymeg's dims read of a model's config, from the transformers config (``hf``)."""
    block_size: int          # max_position_embeddings, or the smallest sliding window
    vocab_size: int
    padded_vocab_size: int   # the embedding's rows (transformers does not pad)
    model_type: str
    hf: object = None
    n_experts: int = 0


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers' attention interface: (B, heads, T, head_dim) q and (B, kv heads, T, head_dim)
    k, v (rotated) -> ((B, T, heads, head_dim), None), by the module's core_attention (causal, within
    block_size and so within any sliding window; its own dropout)."""
    head_dim = query.size(-1)
    if scaling is not None and abs(scaling - head_dim ** -0.5) > 1e-12 * head_dim ** -0.5:
        raise ValueError(f"{type(module).__name__} scales attention by {scaling}, not 1/sqrt(head_dim="
                         f"{head_dim}): tinymeg's attention (and ring attention) computes the standard scaling")
    groups = query.size(1) // key.size(1)
    if groups > 1:   # each key/value head serves `groups` query heads (transformers' repeat_kv)
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    # rotary in float32 (block_args) leaves q, k in float32 when the model computes in bf16
    y = module.core_attention(query.to(value.dtype), key.to(value.dtype), value)
    return y.transpose(1, 2), None


class TransformersCausalLM(CausalLM):
    """A transformers Llama-family causal LM as a tinymeg CausalLM (see the module docstring)."""
    EMBEDDINGS = ("model.embed_tokens",)
    BLOCKS, NORM, HEAD = "model.layers", "model.norm", "lm_head"

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        missing = [name for name in PARTS if not _has(hf_model, name)]
        if missing:
            raise TypeError(f"{type(hf_model).__name__} has no {', '.join(missing)}: tinymeg adapts transformers "
                            f"decoders laid out as Llama, Qwen2 and Mistral are (model.embed_tokens, model.layers, "
                            f"model.norm, model.rotary_emb, lm_head)")
        from transformers import AttentionInterface  # the caller has transformers: it built hf_model
        AttentionInterface.register(ATTENTION, _attention)
        hf_model.set_attn_implementation(ATTENTION)
        hf = hf_model.config
        self.model, self.lm_head = hf_model.model, hf_model.lm_head
        rows = self.model.embed_tokens.weight.size(0)
        windows = [getattr(layer.self_attn, "sliding_window", getattr(hf, "sliding_window", None))
                   for layer in self.model.layers]   # Qwen2: per layer; Mistral: the config's
        self.config = TransformersConfig(block_size=min([hf.max_position_embeddings, *filter(None, windows)]),
                                         vocab_size=hf.vocab_size, padded_vocab_size=rows,
                                         model_type=hf.model_type, hf=hf)
        for layer in self.model.layers:
            layer.self_attn.core_attention = CausalAttention(getattr(hf, "attention_dropout", 0.0))

    def embed(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(idx)

    def block_args(self, pos: torch.Tensor) -> dict:
        position_ids = pos[None]
        # the rotary module reads only the device and dtype of its first argument: float32 angles
        cos, sin = self.model.rotary_emb(pos.new_empty(0, dtype=torch.float32), position_ids)
        return {"attention_mask": None, "position_ids": position_ids, "position_embeddings": (cos, sin)}


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def from_transformers(hf_model: nn.Module) -> TransformersCausalLM:
    """``hf_model`` (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM...) as a tinymeg CausalLM
    that shares its parameters; it switches hf_model's attention to tinymeg's (see the module docstring)."""
    return TransformersCausalLM(hf_model)
