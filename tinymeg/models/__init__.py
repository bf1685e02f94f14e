from .gpt2 import GPT2Model, GPTConfig
from .moe import MoE

__all__ = ["GPT2Model", "GPTConfig", "MoE"]
