"""The files bundled with the package, under `assets/`: a small sentencepiece tokenizer
trained on the synthetic facts of the demo, those facts as pretraining text and as
instructions, and the pictures of the multi-modal demo. The demos, the tests and the
benchmarks read them; `scripts/` regenerates each one byte for byte."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER = ASSETS / "tokenizer.model"
SYNTHETIC_FILES = {
    "pretrain": ASSETS / "synthetic" / "pretrain.jsonl",
    "train": ASSETS / "synthetic" / "instructions_train.jsonl",
    "heldout": ASSETS / "synthetic" / "instructions_heldout.jsonl",
}
SHAPES_DIR = ASSETS / "shapes"
SHAPES_FILES = {"train": SHAPES_DIR / "train.jsonl", "heldout": SHAPES_DIR / "heldout.jsonl",
                "blank": SHAPES_DIR / "blank.png"}
