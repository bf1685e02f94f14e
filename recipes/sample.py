"""Generate text from a trained model in one process (no torchrun):

    python recipes/sample.py model.pt --prompt "ROMEO:" --tokens 300     # exported (recipes/export.py)
    python recipes/sample.py ck/                                          # or a checkpoint directly
"""
import argparse
import json
import os

import torch

from tinymeg.models import GPT2Model, GPTConfig
from tinymeg.train.checkpoint import load_model, tokenizer_from_meta


def load(path: str, device: str):
    if os.path.isdir(path):
        return load_model(path, device)
    config = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(config):
        raise FileNotFoundError(f"{config} not found: recipes/export.py writes it next to {path}")
    with open(config) as f:
        meta = json.load(f)
    model = GPT2Model(GPTConfig(**meta["model_config"]))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.to(device), meta


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description="Sample text from an exported model or a checkpoint.")
    p.add_argument("model", help="model.pt from recipes/export.py, or a checkpoint / --ckpt-dir")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    model, meta = load(args.model, args.device)
    tokenizer = tokenizer_from_meta(meta)
    if tokenizer is None:
        raise SystemExit(f"{args.model} records no tokenizer (trained on a token file without tiktoken): "
                         f"install tiktoken to sample GPT-2 tokens")
    model.eval()
    prompt = torch.tensor([tokenizer.encode(args.prompt or "\n")], device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    out = model.generate(prompt, args.tokens, temperature=args.temperature, top_k=args.top_k, generator=gen)
    text = tokenizer.decode(out[0].tolist())
    print(text)
    return text


if __name__ == "__main__":
    main()
