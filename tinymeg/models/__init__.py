from .gpt2 import GPT2Model, GPTConfig

__all__ = ["GPT2Model", "GPTConfig"]
