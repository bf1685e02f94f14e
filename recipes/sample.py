"""Generate text from a trained model in one process (no torchrun):

    python recipes/sample.py model.pt --prompt "ROMEO:" --tokens 300     # exported (recipes/export.py)
    python recipes/sample.py ck/                                          # or a checkpoint directly

Generation keeps each layer's keys and values (a KV cache), so a token costs one token's
forward, until the text outgrows the model's context and the window slides.
"""
import argparse
import json
import os
import sys

import torch

from tinymeg.train.checkpoint import build_model, load_model, tokenizer_from_meta


def load(path: str, device: str):
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} does not exist: pass a file written by recipes/export.py "
                         f"(model.pt) or a checkpoint directory (--ckpt-dir of a training run)")
    if os.path.isdir(path):
        return load_model(path, device)
    config = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(config):
        raise SystemExit(f"error: {config} not found: recipes/export.py writes it next to {path}; "
                         f"export again, or sample from the checkpoint directory instead")
    with open(config) as f:
        meta = json.load(f)
    model = build_model(meta)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.to(device), meta


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description="Sample text from an exported model or a checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="model.pt from recipes/export.py, or a checkpoint / --ckpt-dir")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="> 0; lower is more conservative")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens")
    p.add_argument("--seed", type=int, default=1337, help="the sampling generator's seed")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when there is a GPU, else cpu")
    args = p.parse_args(argv)
    if args.temperature <= 0 or args.tokens < 0 or args.top_k < 1:
        p.error(f"need --temperature > 0, --tokens >= 0, --top-k >= 1; got {args.temperature}, {args.tokens}, "
                f"{args.top_k}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device: pass --device cpu (or auto)")
    model, meta = load(args.model, device)
    tokenizer = tokenizer_from_meta(meta)
    if tokenizer is None:
        raise SystemExit(f"error: {args.model} records no tokenizer (trained on a token file without tiktoken): "
                         f"install tiktoken to sample GPT-2 tokens")
    model.eval()
    prompt = torch.tensor([tokenizer.encode(args.prompt or "\n")], device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(prompt, args.tokens, temperature=args.temperature, top_k=args.top_k, generator=gen)
    text = tokenizer.decode(out[0].tolist())
    print(text)
    sys.stdout.flush()
    return text


if __name__ == "__main__":
    main()
