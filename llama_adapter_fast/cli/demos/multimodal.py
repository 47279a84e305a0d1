"""`llama-adapter-fast demo-mm`: the multi-modal LLaMA-Adapter end to end, sized for a CPU.

1. The tiny LLaMA of `demo` (pretrained on plain sentences; reused when a previous run
   left it under runs/, else pretrained here the same way).
2. A tiny CLIP vision tower. No pretrained encoder ships, and a randomly initialized one
   is not enough (with `--encoder-steps 0` the fine-tuned adapter answers 37% of the
   held-out questions with the pictures, 35% with a blank one). So it is pre-trained for
   a few seconds with CLIP's contrastive objective, pictures against captions ("three red
   circle up"; the text tower is a bag of words), on pictures drawn afresh from
   `shape_pictures` (none of them a held-out picture), then frozen and saved as a Hugging
   Face CLIPVisionModelWithProjection folder.
3. Fine-tuning of the adaption prompts, gates and image projection on the bundled
   picture questions (the LLaMA and the encoder frozen).
4. Answers to the questions about the held-out pictures, with each picture and with a
   blank picture in its place: the difference is what the adapter reads off the image.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llama_adapter_fast.bundled import SHAPES_DIR, SHAPES_FILES, SYNTHETIC_FILES
from llama_adapter_fast.cli.demos import shape_pictures
from llama_adapter_fast.cli.options import int_at_least
from llama_adapter_fast.ops import BACKENDS

# A ViT with 4 x 4 patches of 8 pixels, width 64, 4 layers: about 0.2M parameters.
DEMO_ENCODER = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                    image_size=32, patch_size=8, projection_dim=32)
ENCODER_PRETRAIN = dict(pictures=3000, picture_seed=3, steps=400, batch_size=64, lr=3e-3, weight_decay=0.1)
DEMO_MM_FINETUNE = dict(batch_size=16, max_steps=300, lr=5e-2, weight_decay=0.02, warmup_steps=45,
                        max_seq_len=128, adapter_len=10)
CAPTION_FACTS = ("colour", "count", "shape", "position")


def _caption_words(facts: dict[str, str]) -> list[str]:
    return [facts[k] for k in CAPTION_FACTS]


def pretrain_demo_encoder(folder: Path, *, steps: int, seed: int = 0, progress: bool = True):
    """A tiny CLIP vision tower pre-trained contrastively on fresh pictures, frozen and saved
    in `folder` (config.json, model.safetensors, preprocessor_config.json). Returns the
    encoder and the last contrastive loss (None with steps = 0: the random tower, kept to
    measure what pre-training brings)."""
    from PIL import Image
    from tqdm.auto import tqdm
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from llama_adapter_fast.models.vision import ImageEncoder, image_processor

    p = ENCODER_PRETRAIN
    torch.manual_seed(seed)  # transformers initializes the tower from torch's global generator
    g = torch.Generator().manual_seed(seed)  # the text tower and the batch order; the pictures are fixed
    tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**DEMO_ENCODER))
    processor = image_processor(image_size=DEMO_ENCODER["image_size"])

    def save() -> None:
        tower.save_pretrained(str(folder))
        processor.save_pretrained(str(folder))
    # Pictures from a stream of their own, never one of the bundled held-out pictures.
    held = {(SHAPES_DIR / r["image"]).read_bytes() for r in _read_jsonl(SHAPES_FILES["heldout"])}
    rng = random.Random(p["picture_seed"])
    pictures, captions = [], []
    while len(pictures) < p["pictures"]:
        pixels, facts = shape_pictures.draw(rng)
        if shape_pictures.png_bytes(pixels) in held:
            continue
        pictures.append(Image.fromarray(shape_pictures.to_rgb(pixels)))
        captions.append(_caption_words(facts))
    if steps == 0:
        save()
        return ImageEncoder.from_pretrained(folder), None
    pixel_values = processor(images=pictures, return_tensors="pt")["pixel_values"]
    vocab = sorted({w for c in captions for w in c})
    words = torch.tensor([[vocab.index(w) for w in c] for c in captions])
    caption_id = torch.unique(words, dim=0, return_inverse=True)[1]
    text_tower = torch.nn.EmbeddingBag(len(vocab), DEMO_ENCODER["projection_dim"], mode="sum")
    with torch.no_grad():
        text_tower.weight.copy_(torch.randn(text_tower.weight.shape, generator=g))
    logit_scale = torch.nn.Parameter(torch.tensor(2.659))  # CLIP's initial temperature, 1 / 0.07
    tower.requires_grad_(True).train()
    params = [*tower.parameters(), *text_tower.parameters(), logit_scale]
    optimizer = torch.optim.AdamW(params, lr=p["lr"], weight_decay=p["weight_decay"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, p["lr"], total_steps=steps, pct_start=0.1)
    for _ in tqdm(range(steps), desc="encoder", disable=not progress, dynamic_ncols=True):
        batch = torch.randint(0, len(pictures), (p["batch_size"],), generator=g)
        image = F.normalize(tower(pixel_values=pixel_values[batch]).image_embeds, dim=-1)
        text = F.normalize(text_tower(words[batch]), dim=-1)
        logits = logit_scale.exp() * image @ text.T
        # Pictures with the same caption are all positives of each other.
        same = (caption_id[batch][:, None] == caption_id[batch][None]).float()
        target = same / same.sum(1, keepdim=True)
        loss = (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.log_softmax(0)).sum(0).mean()) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    tower.requires_grad_(False).eval()
    save()
    return ImageEncoder.from_pretrained(folder), loss.item()


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cached_base(candidates: list[Path], demo_model: dict, vocab_size: int) -> Path | None:
    """A base folder left by an earlier run with the demo's shape (written atomically, so
    present means complete)."""
    for folder in candidates:
        config_path = folder / "config.json"
        if not (config_path.is_file() and (folder / "model.safetensors").is_file()
                and (folder / "tokenizer.model").is_file()):
            continue
        c = json.loads(config_path.read_text())
        if (c.get("hidden_size"), c.get("num_hidden_layers"), c.get("num_attention_heads"), c.get("vocab_size"),
                c.get("max_position_embeddings")) == (demo_model["dim"], demo_model["n_layers"],
                                                      demo_model["n_heads"], vocab_size, demo_model["max_seq_len"]):
            return folder
    return None


def _rate(answers: list[str], records: list[dict], task: str | None = None) -> tuple[int, int]:
    pairs = [(a, r) for a, r in zip(answers, records, strict=True) if task is None or r["task"] == task]
    return sum(a.strip() == r["output"] for a, r in pairs), len(pairs)


def add_parser(sub) -> None:
    p = sub.add_parser("demo-mm", help="the multi-modal adapter: fine-tune on pictures, answer held-out pictures",
                       description="Reuse or pretrain the tiny LLaMA of `demo`, pre-train a tiny CLIP vision tower, "
                                   "fine-tune prompts, gates and image projection on questions about pictures, then "
                                   "answer questions about held-out pictures with and without them.")
    p.add_argument("--out", default="runs/demo-mm", help="output folder")
    p.add_argument("--base", default=None, help="use this base folder (default: runs/demo/base if present)")
    p.add_argument("--attention-backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default=None)
    p.add_argument("--pretrain-steps", type=int_at_least(1), default=None)
    p.add_argument("--encoder-steps", type=int_at_least(0), default=None, help="contrastive steps of the image tower "
                                                                   "(0: keep it random)")
    p.add_argument("--finetune-steps", type=int_at_least(1), default=None)
    p.add_argument("--show", type=int, default=12, help="held-out answers to print")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the matrices are tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tower's and the adapter's initialization")
    p.add_argument("--no-progress", action="store_true")


def run(a) -> int:
    """The demo-mm command (arguments from cli's parser)."""
    from llama_adapter_fast.cli.demos.text import DEMO_MODEL, DEMO_PRETRAIN
    from llama_adapter_fast.generation import answer
    from llama_adapter_fast.models.config import ModelArgs
    from llama_adapter_fast.models.multimodal import MultiModalLLaMAAdapter
    from llama_adapter_fast.training.bases import load_base
    from llama_adapter_fast.training.config import TrainConfig
    from llama_adapter_fast.training.recipes import finetune, pretrain
    from llama_adapter_fast.training.tokenizer import Tokenizer

    t0 = time.perf_counter()
    out = Path(a.out)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = a.attention_backend
    shown = "triton" if backend == "auto" and device.type == "cuda" else ("sdpa" if backend == "auto" else backend)
    tokenizer = Tokenizer()
    train_records = _read_jsonl(SHAPES_FILES["train"])
    heldout = _read_jsonl(SHAPES_FILES["heldout"])
    n_train_pictures = len({r["image"] for r in train_records})
    n_held_pictures = len({r["image"] for r in heldout})
    threads = ""
    if a.threads < 1:
        raise ValueError(f"threads: must be >= 1, got {a.threads}")
    if device.type == "cpu":
        # The demo's matrices are tiny: a second thread gains little, and where the cores are
        # shared with other work, OpenMP threads waiting for each other lose a lot (measured on
        # a busy 2-core machine: 100 steps of the base's pretraining took 19 s on one thread,
        # 321 s on two).
        torch.set_num_threads(a.threads)
        threads = f", {a.threads} thread{'s' if a.threads > 1 else ''}"
    print(f"Multi-modal LLaMA-Adapter demo on {device.type.upper()}{threads} (gated attention backend: {shown})\n")

    base_dir = Path(a.base) if a.base else _cached_base([out / "base", Path("runs/demo/base")], DEMO_MODEL,
                                                         tokenizer.n_words)
    if base_dir is not None:
        print(f"[1/4] The tiny LLaMA of `demo`, pretrained earlier: {base_dir}\n")
    else:
        base_dir = out / "base"
        args = ModelArgs(vocab_size=tokenizer.n_words, adapter_layers=0, **DEMO_MODEL)
        steps = a.pretrain_steps or DEMO_PRETRAIN["max_steps"]
        print(f"[1/4] The tiny LLaMA of `demo` (dim {args.dim}, {args.n_layers} layers), pretrained on plain "
              f"sentences for {steps} steps (reused by later runs).")
        cfg = TrainConfig(**{**DEMO_PRETRAIN, "max_steps": steps}, out_dir=str(base_dir), device=str(device),
                          overwrite=True, print_every=max(1, steps // 4), save_every=steps, seed=0,
                          progress=not a.no_progress)
        _, res = pretrain(cfg, args, SYNTHETIC_FILES["pretrain"], tokenizer=tokenizer)
        print(f"      base: {base_dir} ({res.seconds:.0f} s)\n")

    steps = ENCODER_PRETRAIN["steps"] if a.encoder_steps is None else a.encoder_steps
    how = (f"pre-trained with CLIP's contrastive loss on {ENCODER_PRETRAIN['pictures']:,} fresh pictures and their "
           f"captions for {steps} steps" if steps else "left at its random initialization")
    print(f"[2/4] A tiny CLIP vision tower (ViT: {DEMO_ENCODER['image_size']} px pictures, "
          f"{DEMO_ENCODER['patch_size']} px patches, width {DEMO_ENCODER['hidden_size']}, "
          f"{DEMO_ENCODER['num_hidden_layers']} layers), {how}, then frozen.")
    t1 = time.perf_counter()
    encoder, loss = pretrain_demo_encoder(out / "encoder", steps=steps, seed=a.seed, progress=not a.no_progress)
    print("      " + ("" if loss is None else f"contrastive loss {loss:.3f}; ")
          + f"saved as a Hugging Face CLIP folder: {out / 'encoder'} ({time.perf_counter() - t1:.0f} s)\n")

    steps = a.finetune_steps or DEMO_MM_FINETUNE["max_steps"]
    models, results = {}, {}
    for k, fusion in enumerate(("all", "early")):
        torch.manual_seed(a.seed)  # the prompts and the projection start the same whatever ran before
        llama = load_base(base_dir, device=device, adapter_len=DEMO_MM_FINETUNE["adapter_len"],
                          adapter_layers=DEMO_MODEL["n_layers"], attention_backend=backend)
        model = MultiModalLLaMAAdapter(llama, encoder, image_fusion=fusion)
        n_prompt = sum(p.numel() for _, p in llama.adapter_parameters())
        n_proj = sum(p.numel() for p in model.image_projection.parameters())
        where = ("the image in every adapted layer" if fusion == "all" else
                 f"early fusion (V2): the image in the lowest {model.early_layers} of {len(llama.adapter_layers())} "
                 f"adapted layers, plain prompts above")
        print(f"[3{'ab'[k]}/4] Fine-tuning prompts and gates ({n_prompt:,}) and the image projection ({n_proj:,}: "
              f"global features of encoder layers {encoder.layers} -> width {llama.args.dim}), {where}; LLaMA and "
              f"encoder frozen.\n      {len(train_records)} questions about {n_train_pictures} pictures "
              f"({SHAPES_FILES['train'].name}: colour, count, up or down); {steps} steps.")
        cfg = TrainConfig(**{**DEMO_MM_FINETUNE, "max_steps": steps}, data=str(SHAPES_FILES["train"]),
                          out_dir=str(out / ("adapter" if fusion == "all" else "adapter-early")),
                          attention_backend=backend, device=str(device), overwrite=True,
                          print_every=max(1, steps // 6), save_every=steps, seed=a.seed, progress=not a.no_progress,
                          feature_cache=str(out / "image_features"))
        res = finetune(cfg, model=model, tokenizer=tokenizer)
        print(f"      loss {res.first_loss:.3f} -> {res.final_loss:.3f} ({res.seconds:.0f} s)")
        print(f"      adapter: {res.adapter_path}")
        print(f"      loss plot: {res.plot_path}\n")
        models[fusion], results[fusion] = model.eval(), res
    res = results["all"]

    images = [str(SHAPES_DIR / r["image"]) for r in heldout]
    blanks = [str(SHAPES_FILES["blank"])] * len(heldout)
    with_images = {f: answer(m, tokenizer, heldout, images=images, max_new_tokens=4, batch_size=64)
                   for f, m in models.items()}
    blank = {f: answer(m, tokenizer, heldout, images=blanks, max_new_tokens=4, batch_size=64)
             for f, m in models.items()}
    print(f"[4/4] {len(heldout)} questions about {n_held_pictures} held-out pictures (never seen in training), "
          f"answered with each picture and with a blank one, by both adapters.")
    print(f"      {'picture':26s} {'question':42s} {'expected':9s} {'blank':9s} with the picture (all layers)")
    # Every third record is about the next picture: walk through pictures and tasks together.
    n_tasks = len(shape_pictures.QUESTIONS)
    shown_rows = [n_tasks * (k * n_held_pictures // max(1, a.show)) + k % n_tasks for k in range(a.show)]
    for i in [i for i in shown_rows if i < len(heldout)]:
        r = heldout[i]
        mark = "ok" if with_images["all"][i].strip() == r["output"] else "--"
        print(f"      {r['image']:26s} {r['instruction'][:42]:42s} {r['output']:9s} {blank['all'][i][:9]:9s} "
              f"{with_images['all'][i][:12]:12s} {mark}")
    print(f"\n      exact answers          {'image in every layer':>31s} {'early fusion':>31s}")
    print(f"      {'':22s} {'blank':>14s} {'with picture':>16s} {'blank':>14s} {'with picture':>16s}")
    for task in (None, "colour", "count", "position"):
        cells = []
        for fusion in ("all", "early"):
            (nb, n), (ni, _) = _rate(blank[fusion], heldout, task), _rate(with_images[fusion], heldout, task)
            cells.append(f"{nb:7d} ({100 * nb / n:3.0f}%) {ni:9d} ({100 * ni / n:3.0f}%)")
        label = "all questions" if task is None else task
        print(f"      {label:22s} {cells[0]} {cells[1]}")
    example = heldout[0]
    # Relative to the working directory when the pictures lie under it, so the line reads short.
    picture = os.path.relpath(SHAPES_DIR / example["image"])
    print(f"\nTry one: llama-adapter-fast generate --base {base_dir} --adapter {res.adapter_path} "
          f"--image {picture} --prompt \"{example['instruction']}\"")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0
