from .gpt2 import CausalAttention, GPT2Model, GPTConfig

__all__ = ["GPT2Model", "GPTConfig", "CausalAttention"]
