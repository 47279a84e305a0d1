"""Pictures of coloured shapes, and questions about them, for the multi-modal demo.

Each picture is 32 x 32 pixels: one to four shapes of one kind (circle, square or
triangle) and one colour (red, green, blue, yellow or black) on white, all in the upper
half or all in the lower half, at random sizes and places. Three Alpaca-format questions
ask about every picture: its colour, how many shapes it has, and whether they are up or
down. The answers are words the demo's tiny LLaMA learnt in pretraining (colours,
numbers, up and down), so the adapter has to learn to read them off the picture.

Pictures are drawn from seeded random streams (`draw`), so every run draws the same ones.
The PNG files are written here rather than by Pillow, with 4-bit palette pixels in
uncompressed ("stored") deflate blocks: their bytes depend on the pixels alone, so no zlib
version or build can change them, and a test regenerates the bundled ones byte for byte
(scripts/make_shape_images.py writes them).
"""

from __future__ import annotations

import json
import random
import struct
import zlib
from pathlib import Path

SIZE = 32
PALETTE = [(255, 255, 255), (220, 40, 40), (40, 170, 60), (40, 80, 220), (240, 200, 30), (20, 20, 20)]
COLOURS = ["red", "green", "blue", "yellow", "black"]  # palette entries 1..5 (0 is the white background)
SHAPES = ["circle", "square", "triangle"]
COUNTS = ["one", "two", "three", "four"]
QUESTIONS = {
    "colour": "What colour are the shapes in the picture?",
    "count": "How many shapes are in the picture?",
    "position": "Are the shapes up or down in the picture?",
}
N_TRAIN, N_HELDOUT = 180, 60
SEEDS = {"train": 1, "heldout": 2}


def shape_mask(kind: str, size: int) -> list[list[bool]]:
    """Pixels of a shape in its size x size box, tested at pixel centres."""
    half = size / 2
    rows = []
    for y in range(size):
        row = []
        for x in range(size):
            px, py = x + 0.5, y + 0.5
            if kind == "square":
                inside = True
            elif kind == "circle":
                inside = (px - half) ** 2 + (py - half) ** 2 <= half * half
            else:  # a triangle pointing up: its half width grows linearly from the apex
                inside = abs(px - half) <= half * py / size
            row.append(inside)
        rows.append(row)
    return rows


def draw(rng: random.Random) -> tuple[list[list[int]], dict[str, str]]:
    """One picture (rows of palette indices) and its facts."""
    colour, kind = rng.randrange(len(COLOURS)), rng.choice(SHAPES)
    count = rng.randint(1, 4)
    size = rng.choice([s for s in (5, 6, 7, 8) if count * s + (count - 1) * 2 <= SIZE])
    up = rng.random() < 0.5
    # Non-overlapping columns: spread the free width as random gaps (at least 2 pixels apart).
    free = SIZE - count * size - (count - 1) * 2
    cuts = sorted(rng.randint(0, free) for _ in range(count))
    lefts = [cut + i * (size + 2) for i, cut in enumerate(cuts)]
    pixels = [[0] * SIZE for _ in range(SIZE)]
    mask = shape_mask(kind, size)
    for left in lefts:
        top = rng.randint(0, SIZE // 2 - size) + (0 if up else SIZE // 2)
        for y in range(size):
            for x in range(size):
                if mask[y][x]:
                    pixels[top + y][left + x] = colour + 1
    facts = {"colour": COLOURS[colour], "count": COUNTS[count - 1], "position": "up" if up else "down",
             "shape": kind}
    return pixels, facts


def png_bytes(pixels: list[list[int]]) -> bytes:
    """A 4-bit palette PNG whose deflate stream is uncompressed (stored blocks)."""
    raw = bytearray()
    for row in pixels:
        raw.append(0)  # filter type None
        for x in range(0, len(row), 2):
            raw.append(row[x] << 4 | (row[x + 1] if x + 1 < len(row) else 0))
    stream = bytearray(b"\x78\x01")  # zlib header: deflate, 32K window, no dictionary
    for start in range(0, max(len(raw), 1), 65535):
        block = raw[start:start + 65535]
        final = 1 if start + 65535 >= len(raw) else 0
        stream += struct.pack("<BHH", final, len(block), 0xFFFF ^ len(block)) + block
    stream += struct.pack(">I", zlib.adler32(bytes(raw)))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = len(pixels), len(pixels[0])
    header = struct.pack(">IIBBBBB", width, height, 4, 3, 0, 0, 0)  # 4-bit, palette, deflate, no interlace
    palette = b"".join(bytes(c) for c in PALETTE)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"PLTE", palette) + chunk(b"IDAT", bytes(stream)) \
        + chunk(b"IEND", b"")


def make_split(name: str, n: int, avoid: set[bytes]) -> tuple[list[tuple[str, bytes]], list[dict]]:
    rng = random.Random(SEEDS[name])
    files, records = [], []
    while len(files) < n:
        pixels, facts = draw(rng)
        data = png_bytes(pixels)
        if data in avoid:  # never the same picture twice, nor a training picture among the held-out ones
            continue
        avoid.add(data)
        path = f"images/{name}_{len(files):03d}.png"
        files.append((path, data))
        for task, question in QUESTIONS.items():
            records.append({"instruction": question, "input": "", "output": facts[task], "image": path, "task": task})
    return files, records


def to_rgb(pixels: list[list[int]]):
    """(SIZE, SIZE, 3) uint8 numpy array of a picture's palette indices."""
    import numpy as np

    return np.asarray(PALETTE, dtype=np.uint8)[np.asarray(pixels)]


def blank_picture() -> list[list[int]]:
    return [[0] * SIZE for _ in range(SIZE)]


def write_bundle(out: str | Path) -> dict[str, int]:
    """The demo's pictures and questions: images/train_NNN.png, images/heldout_NNN.png,
    blank.png (white, the demo's "no picture"), train.jsonl and heldout.jsonl (records
    {"instruction", "input", "output", "image", "task"}, images relative to the file)."""
    out = Path(out)
    seen: set[bytes] = set()
    train_files, train = make_split("train", N_TRAIN, seen)
    held_files, heldout = make_split("heldout", N_HELDOUT, seen)
    random.Random(0).shuffle(train)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for path, data in train_files + held_files + [("blank.png", png_bytes(blank_picture()))]:
        (out / path).write_bytes(data)
    for name, records in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        with open(out / name, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    return {"train_pictures": len(train_files), "heldout_pictures": len(held_files), "train_questions": len(train),
            "heldout_questions": len(heldout)}
