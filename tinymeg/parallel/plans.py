"""Shipped tensor-parallel plans, by name or for a model: ``tm.plans.get("llama")``,
``tm.plans.for_model(model)``.

| name           | model                                   | sharded                                    |
|----------------|-----------------------------------------|--------------------------------------------|
| `tinymeg-gpt2` | tinymeg's `GPT2Model`                   | c_attn (by heads), c_fc / c_proj; tied wte |
| `tinymeg-llama`| tinymeg's `Llama`, and a transformers   | as `llama`; the head gathers the sequence  |
|                | model adapted by `from_transformers`    |                                            |
| `llama`        | transformers `LlamaForCausalLM`         | q/k/v, gate/up / o, down; embed_tokens,    |
| `qwen2`        | transformers `Qwen2ForCausalLM`         | lm_head (vocabulary; tied or not)          |
| `mistral`      | transformers `MistralForCausalLM`       |                                            |
| `gpt2`         | transformers `GPT2LMHeadModel`          | Conv1D c_attn (by heads), c_fc / c_proj;   |
|                |                                         | tied wte                                   |

Everything a plan does not name (norms, rotary embeddings, position embeddings, whatever
their class) is replicated. Each getter returns a fresh dict that apply_tensor_parallel takes
as is, so a plan can be edited before use. Options:

- ``sequence_parallel``: activations sharded on the sequence between the blocks' projections;
- ``vocab_parallel`` (default True): shard the embedding and LM head over the vocabulary,
  which must then divide by tp (the Llama-family plans name the embedding, so a vocabulary tp
  does not divide is an error: pass False to replicate it; the GPT-2 plans leave the tied
  embedding to the default rule, which replicates it where tp does not divide it, as GPT-2's
  50257 at tp=2);
- ``loss_parallel`` (tinymeg's models only): the loss from vocab-sharded logits.

The plans for tinymeg's models depend on the model's config: a model whose every block's MLP is
a mixture of experts has no dense MLP to shard (MoE layers are expert-parallel, not
tensor-parallel: see tinymeg.parallel.expert_parallel); ``for_model`` passes the config.

Hugging Face attention reads its sequence length from its input and its head count from the
projections' width (``view(..., -1, head_dim)``), so the same attention code runs on a rank's
heads; GPT-2's also splits c_attn's output at ``split_size``, a width that each rank holds a
1/tp share of (``sharded_attributes``). Attention dropout that transformers passes to
``F.scaled_dot_product_attention`` draws one mask for all heads on each rank (the same on
every TP rank): set ``attention_dropout``/``attn_pdrop`` to 0 when training with TP, as
Llama-family models do anyway.
"""
from __future__ import annotations

import torch.nn as nn

from .plan import ColumnParallel, RowParallel, VocabParallel, gpt2_tp_config


def _all_moe(config) -> bool:
    return bool(getattr(config, "n_experts", 0)) and config.moe_every == 1


def _llama_like(vocab_parallel: bool, config=None) -> dict:
    plan = {
        "self_attn.q_proj": ColumnParallel(), "self_attn.k_proj": ColumnParallel(),
        "self_attn.v_proj": ColumnParallel(), "self_attn.o_proj": RowParallel(),
    }
    if not _all_moe(config):
        plan.update({"mlp.gate_proj": ColumnParallel(), "mlp.up_proj": ColumnParallel(),
                     "mlp.down_proj": RowParallel()})
    if vocab_parallel:  # a tied lm_head shares embed_tokens' sharded weight (apply_tensor_parallel)
        plan.update({"embed_tokens": VocabParallel(), "lm_head": ColumnParallel(gather_output=True)})
    else:
        plan["vocab_embedding_patterns"] = []
    return plan


def _hf_gpt2(vocab_parallel: bool, config=None) -> dict:
    plan = {
        "attn.c_attn": ColumnParallel(output_chunks=3), "attn.c_proj": RowParallel(),
        "mlp.c_fc": ColumnParallel(), "mlp.c_proj": RowParallel(),
        "sharded_attributes": ["attn.split_size"],   # c_attn's output is split into q, k, v at this width
    }
    # vocab_parallel: the default rule shards the tied wte, and the lm_head with it, where tp divides
    # its rows (GPT-2's 50257 at tp=2 stays replicated rather than refused)
    if not vocab_parallel:
        plan["vocab_embedding_patterns"] = []
    return plan


def _tinymeg_gpt2(vocab_parallel: bool, config=None) -> dict:
    plan = {k: list(v) if isinstance(v, list) else v for k, v in gpt2_tp_config(config).items()}
    if not vocab_parallel:
        plan["vocab_embedding_patterns"] = []
    return plan


def _tinymeg_llama(vocab_parallel: bool, config=None) -> dict:
    # transformers' names, so transformers' plan; with sequence parallelism the sequence stays
    # sharded through the final norm and the vocab-sharded head gathers it (as GPT-2's plan)
    return {**_llama_like(vocab_parallel, config), "sequence_parallel_exit": "lm_head"}


PLANS = {"tinymeg-gpt2": _tinymeg_gpt2, "tinymeg-llama": _tinymeg_llama, "llama": _llama_like,
         "qwen2": _llama_like, "mistral": _llama_like, "gpt2": _hf_gpt2}
TINYMEG_PLANS = ("tinymeg-gpt2", "tinymeg-llama")  # tinymeg's models: their loss path can be vocab-parallel
# transformers' model_type -> plan name (tinymeg's GPT2Model has no model_type)
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "gpt2": "gpt2"}


def names() -> list[str]:
    return sorted(PLANS)


def get(name: str, *, sequence_parallel: bool = False, vocab_parallel: bool = True,
        loss_parallel: bool = False, config=None) -> dict:
    """The shipped plan called ``name`` (see the module docstring), with these options, for a
    tinymeg model with this ``config`` (None: a dense one)."""
    if name not in PLANS:
        raise ValueError(f"no shipped tensor-parallel plan called {name!r}; there are {names()}. "
                         f"For another model, write a plan: {{pattern: tm.ColumnParallel() / tm.RowParallel() / "
                         f"tm.VocabParallel()}} (README: Bring your own model)")
    if loss_parallel and name not in TINYMEG_PLANS:
        raise ValueError(f"loss_parallel applies to tinymeg's GPT2Model and Llama (their loss path), not to "
                         f"{name!r}, whose model computes its own loss from the gathered logits")
    plan = PLANS[name](vocab_parallel, config)
    if sequence_parallel:
        plan["sequence_parallel"] = True
    if loss_parallel:
        plan["loss_parallel"] = True
    return plan


def for_model(model: nn.Module, **options) -> dict:
    """The shipped plan for this model: tinymeg's GPT2Model or Llama (for its config), or a
    transformers model whose ``config.model_type`` has a plan (llama, qwen2, mistral, gpt2).
    Options as for ``get``."""
    from ..models import MODELS, TransformersCausalLM, model_name
    if isinstance(model, tuple(cls for cls, _ in MODELS.values())):
        return get(f"tinymeg-{model_name(model)}", config=model.config, **options)
    if isinstance(model, TransformersCausalLM):  # transformers' names, tinymeg's forward and loss
        return get("tinymeg-llama", config=model.config, **options)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"no shipped tensor-parallel plan for {type(model).__name__} (model_type "
                         f"{model_type!r}); plans exist for {sorted(_MODEL_TYPES)} and tinymeg's GPT2Model and Llama. "
                         f"Write a plan for it (README: Bring your own model)")
    return get(_MODEL_TYPES[model_type], **options)
