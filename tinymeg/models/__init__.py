from .gpt2 import CausalAttention, GPT2Model, GPTConfig
from .moe import MoE

__all__ = ["GPT2Model", "GPTConfig", "CausalAttention", "MoE"]
