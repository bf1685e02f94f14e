"""Export a checkpoint to one file: `python recipes/export.py ck/ -o model.pt` (no torchrun).

Reads a distributed checkpoint saved under any mesh (a step directory, or a --ckpt-dir for its
latest), puts it into an unsharded model (GPT2Model or Llama) and writes ``model.state_dict()``
with ``torch.save``, plus ``model.json`` (model kind and config, tokenizer, step, training
config) next to it:

    model = tinymeg.train.checkpoint.build_model(json.load(open("model.json")))
    model.load_state_dict(torch.load("model.pt"), strict=True)

`python recipes/sample.py model.pt` generates text from it.

``--format hf -o DIR`` writes a Hugging Face directory instead (config.json + model.safetensors)
that ``transformers.GPT2LMHeadModel.from_pretrained(DIR)`` (a Llama: ``LlamaForCausalLM``) loads,
and that ``GPT2Model.from_pretrained(DIR)`` (``Llama.from_pretrained``) and ``recipes/train.py
--init-from DIR`` read back.
"""
import argparse
import json
import os

import torch

from tinymeg.train.checkpoint import load_model


def config_path(model_path: str) -> str:
    return os.path.splitext(model_path)[0] + ".json"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description="Export a tinymeg checkpoint to a single torch.save file.")
    p.add_argument("checkpoint", help="a checkpoint directory (ck/step_000100) or a --ckpt-dir (its latest)")
    p.add_argument("-o", "--out", default=None, help="output state dict (default: model.pt); the config "
                   "goes next to it with a .json suffix. With --format hf: a directory (default: model_hf)")
    p.add_argument("--format", choices=["torch", "hf"], default="torch",
                   help="torch: a torch.save state dict (default); hf: a Hugging Face directory (GPT-2 or Llama)")
    args = p.parse_args(argv)
    args.out = args.out or ("model_hf" if args.format == "hf" else "model.pt")

    model, meta = load_model(args.checkpoint)
    if args.format == "hf":
        model.save_pretrained(args.out)
        print(f"exported step {meta['step']} ({model.num_params():,} parameters) as a Hugging Face "
              f"{type(model).__name__} to {args.out}/")
        return args.out
    torch.save(model.state_dict(), args.out)
    info = {k: meta.get(k) for k in ("step", "model", "model_config", "tokenizer", "train_config")}
    with open(config_path(args.out), "w") as f:
        json.dump(info, f, indent=1)
    n = model.num_params()
    print(f"exported step {meta['step']} ({n:,} parameters, {os.path.getsize(args.out) / 2**20:.1f} MiB) "
          f"to {args.out} and {config_path(args.out)}")
    return args.out


if __name__ == "__main__":
    main()
