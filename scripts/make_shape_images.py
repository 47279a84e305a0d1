"""Generate the bundled pictures and questions of the multi-modal demo, deterministically
(the same bytes on every run; a test checks it).

The drawing lives in llama_adapter_fast/cli/demos/shape_pictures.py (the demo also draws pictures
with it to pre-train its tiny image encoder). Writes into llama_adapter_fast/assets/shapes/:
    images/train_NNN.png, images/heldout_NNN.png   32 x 32 pictures of coloured shapes
    blank.png                                      a white picture: the demo's "no picture"
    train.jsonl, heldout.jsonl                     {"instruction", "input", "output", "image", "task"}

    python scripts/make_shape_images.py [--out FOLDER]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llama_adapter_fast.cli.demos.shape_pictures import write_bundle

OUT = Path(__file__).resolve().parent.parent / "llama_adapter_fast" / "assets" / "shapes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default: the package's assets)")
    args = parser.parse_args()
    counts = write_bundle(args.out)
    print(f"wrote {counts['train_pictures']} training and {counts['heldout_pictures']} held-out pictures, "
          f"{counts['train_questions']} and {counts['heldout_questions']} questions, to {args.out}")


if __name__ == "__main__":
    main()
