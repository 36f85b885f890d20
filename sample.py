"""Sample from Stable Diffusion.

Text to image:
    python sample.py --ckpt SD.safetensors --prompt "a photo of an astronaut" --out img.png
"""
import argparse
import os
import sys

import torch
from PIL import Image

from model.loading import CheckpointError, load_stable_diffusion
from model.pipeline import SAMPLER_NAMES, text_to_image


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="single-file .safetensors checkpoint or diffusers folder")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (classifier-free guidance)")
    p.add_argument("--out", default="sample.png", help="output image (.png/.jpg); with --num-images N, "
                   "files are named <stem>-<i><ext>")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30, help="sampler steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--sampler", default="dpmpp_2m", choices=SAMPLER_NAMES)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 = deterministic)")
    p.add_argument("--height", type=int, default=None, help="pixels; default: the family's native size")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"),
                   help="weights and activations (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    pred = p.add_mutually_exclusive_group()
    pred.add_argument("--v-prediction", dest="prediction_type", action="store_const", const="v_prediction",
                      help="the checkpoint predicts v (SD2-768); overrides detection")
    pred.add_argument("--epsilon", dest="prediction_type", action="store_const", const="epsilon",
                      help="the checkpoint predicts noise (SD1, SD2-512 base); overrides detection")
    p.add_argument("--tokenizer", default=None, help="CLIP vocabulary: a tokenizer/ folder, tokenizer.json, "
                   "vocab.json or bpe_simple_vocab_16e6.txt.gz (default: beside the checkpoint, or $SVP_TOKENIZER)")
    return p.parse_args(argv)


def save_image_atomic(image, path: str):
    """Write via a temp file in the same folder, so an interrupted run leaves no half-written image."""
    stem, ext = os.path.splitext(path)
    tmp = f"{stem}.tmp{ext}"
    Image.fromarray(image.numpy()).save(tmp)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    sd = load_stable_diffusion(args.ckpt, dtype=dtype, prediction_type=args.prediction_type,
                               tokenizer=args.tokenizer).to(device)
    images = text_to_image(sd, args.prompt, args.negative_prompt, steps=args.steps, guidance=args.guidance,
                           sampler=args.sampler, height=args.height, width=args.width, seed=args.seed,
                           num_images=args.num_images, eta=args.eta)
    stem, ext = os.path.splitext(args.out)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for i, image in enumerate(images):
        path = args.out if len(images) == 1 else f"{stem}-{i}{ext}"
        save_image_atomic(image, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
