"""Fetch a Hugging Face checkpoint into weights/NAME (the only place minitune meets the network).

    python weights/download.py Qwen/Qwen2.5-0.5B-Instruct [--out DIR]

Needs the optional `hub` extra (`pip install -e ".[hub]"`). Only the files minitune reads are fetched.
"""

import argparse
import sys
from pathlib import Path

PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("repo_id", help="e.g. Qwen/Qwen2.5-0.5B-Instruct")
    ap.add_argument("--out", help="target folder (default: weights/<name>)")
    args = ap.parse_args()
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        sys.exit('huggingface_hub is missing: pip install -e ".[hub]" (or run: make download MODEL=...)')
    out = Path(args.out or Path(__file__).parent / args.repo_id.split("/")[-1])
    snapshot_download(args.repo_id, local_dir=out, allow_patterns=PATTERNS)
    print(f"saved {args.repo_id} to {out}; try: make lesson-05 ARGS=\"--model {out} --device cuda --dtype bfloat16\"")


if __name__ == "__main__":
    main()
