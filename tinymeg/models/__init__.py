from .base import CausalAttention, CausalLM, LMConfig
from .gpt2 import GPT2Model, GPTConfig
from .hf_causal_lm import TransformersCausalLM, from_transformers
from .llama import Llama, LlamaConfig
from .moe import MoE

# --model name -> (model class, config class): the trainer, checkpoints and export build models by it
MODELS = {"gpt2": (GPT2Model, GPTConfig), "llama": (Llama, LlamaConfig)}


def model_name(model) -> str:
    """The MODELS name of a tinymeg model (of its class, under any parallel wrapper)."""
    for name, (cls, _) in MODELS.items():
        if isinstance(model, cls):
            return name
    raise TypeError(f"{type(model).__name__} is not one of tinymeg's models ({sorted(MODELS)})")


__all__ = ["GPT2Model", "GPTConfig", "Llama", "LlamaConfig", "CausalAttention", "CausalLM", "LMConfig", "MoE",
           "MODELS", "model_name", "TransformersCausalLM", "from_transformers"]
