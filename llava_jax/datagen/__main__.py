"""`python -m llava_jax.datagen --captions=... [--instances=...] --out=DIR --model=NAME [...]`

Generates LLaVA-Instruct-style data from COCO annotations with an OpenAI-compatible teacher (see
llava_jax/datagen/generate.py). The endpoint is --base_url or $OPENAI_BASE_URL; the key is read from the
environment variable named by --api_key_env (default OPENAI_API_KEY), never from the command line.
"""
from __future__ import annotations

import argparse
import os
import sys

from llava_jax.datagen import coco, generate, prompts
from llava_jax import openai_client


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m llava_jax.datagen", description=__doc__.split("\n\n")[1])
  p.add_argument("--captions", required=True, help="COCO captions json (captions_train2017.json)")
  p.add_argument("--instances", default="", help="COCO instances json for object boxes ('' = captions only)")
  p.add_argument("--out", required=True, help="output directory (replies, data set, summary)")
  p.add_argument("--model", required=True, help="teacher model name")
  p.add_argument("--base_url", default="", help="endpoint, e.g. http://127.0.0.1:8000/v1 ('' = $OPENAI_BASE_URL)")
  p.add_argument("--api_key_env", default=openai_client.API_KEY_ENV)
  p.add_argument("--types", default=",".join(prompts.TYPES), help="comma-separated: " + ", ".join(prompts.TYPES))
  p.add_argument("--limit", type=int, default=0, help="first N images only (0 = all)")
  p.add_argument("--image_prefix", default="", help="prefix of the image paths written, e.g. 'coco/train2017/'")
  p.add_argument("--image_position", default="random", choices=("random", "front", "end"))
  p.add_argument("--no_boxes", action="store_true", help="show the teacher captions only")
  p.add_argument("--concurrency", type=int, default=8)
  p.add_argument("--timeout", type=float, default=120.0)
  p.add_argument("--max_retries", type=int, default=6)
  p.add_argument("--temperature", type=float, default=0.7)
  p.add_argument("--max_tokens", type=int, default=1024)
  p.add_argument("--price_prompt_per_1m", type=float, default=0.0, help="for the cost summary")
  p.add_argument("--price_completion_per_1m", type=float, default=0.0)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  types = tuple(t.strip() for t in args.types.split(",") if t.strip())
  images = coco.load_coco(args.captions, args.instances or None, limit=args.limit)
  client = openai_client.ChatClient(args.base_url or None, args.model, os.environ.get(args.api_key_env, ""),
                                    timeout=args.timeout, max_retries=args.max_retries,
                                    concurrency=args.concurrency)
  summary = generate.generate_dataset(
      images, client, args.out, types=types, image_prefix=args.image_prefix, image_position=args.image_position,
      with_boxes=not args.no_boxes, temperature=args.temperature, max_tokens=args.max_tokens,
      price_prompt_per_1m=args.price_prompt_per_1m, price_completion_per_1m=args.price_completion_per_1m)
  return 1 if summary["request_failures"] else 0


if __name__ == "__main__":
  sys.exit(main())
