"""Fine-tuning the multi-modal adapter: instruction records with pictures, their frozen
encoder features computed once (and cached on disk), and `finetune`'s multi-modal set-up."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from llama_adapter_fast.models.llama import LLaMAAdapter
from llama_adapter_fast.models.multimodal import MultiModalLLaMAAdapter
from llama_adapter_fast.models.vision import FeatureCache, ImageEncoder, encode_image_files, image_file_digests
from llama_adapter_fast.training.data import InstructionDataset, load_instructions


class ImageInstructionDataset(InstructionDataset):
    """Alpaca records with an optional "image" (a path relative to the data file, or
    absolute). The frozen encoder's features are computed once, at construction, each
    distinct image file once, and read from `cache` when it has them: training never runs
    the encoder again. Item i adds "image_features" (feature_dim,) and "image_mask" (a bool,
    False for a text-only record, whose features are zeros)."""

    def __init__(self, records: Sequence[dict[str, str]] | str | os.PathLike, tokenizer, encoder: ImageEncoder, *,
                 max_seq_len: int = 512, image_root: str | os.PathLike | None = None,
                 cache: FeatureCache | None = None, progress: bool = True, template: str = "alpaca"):
        source = "records"
        if isinstance(records, (str, os.PathLike)):
            source = str(records)
            image_root = Path(records).parent if image_root is None else image_root
            records = load_instructions(records)
        super().__init__(records, tokenizer, max_seq_len, template)
        root = Path(image_root) if image_root is not None else Path(".")
        with_image = [i for i, r in enumerate(self.records) if r.get("image")]
        paths = [root / self.records[i]["image"] for i in with_image]
        where = [f"{source}: record {i}" for i in with_image]
        digests = image_file_digests(paths, where)
        features = encode_image_files(encoder, paths, cache=cache, progress=progress, where=where, digests=digests)
        # What the features depend on (the encoder and each record's image bytes), for resume.
        self.images_sha256 = hashlib.sha256(json.dumps(
            {"encoder": encoder.fingerprint(), "images": dict(zip(with_image, digests, strict=True))}
        ).encode()).hexdigest()
        self.image_features = torch.zeros(len(self.records), encoder.feature_dim)
        self.image_mask = torch.zeros(len(self.records), dtype=torch.bool)
        if with_image:
            self.image_features[with_image] = features
            self.image_mask[with_image] = True

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(index)
        item["image_features"] = self.image_features[index]
        item["image_mask"] = self.image_mask[index]
        return item


def prepare_finetune(cfg, model: LLaMAAdapter | MultiModalLLaMAAdapter, tokenizer, *, progress: bool = True
                     ) -> tuple[MultiModalLLaMAAdapter, ImageInstructionDataset]:
    """`finetune`'s multi-modal half: the model (wrapping `model` with the encoder of
    cfg.image_encoder unless it is already multi-modal) and the data set with its features."""
    if cfg.strategy == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("strategy: the multi-modal adapter trains with ddp (its base is replicated), not fsdp")
    if not isinstance(model, MultiModalLLaMAAdapter):
        encoder = ImageEncoder.from_pretrained(cfg.image_encoder, layers=cfg.image_layers)
        model = MultiModalLLaMAAdapter(model, encoder, cfg.projection_hidden, cfg.image_fusion, cfg.early_layers)
    encoder = model.image_encoder
    cache_dir = cfg.feature_cache or Path(cfg.out_dir) / "image_features"
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder.to(device)  # encoding on the training device; the trainer moves the rest
    dataset = ImageInstructionDataset(cfg.data, tokenizer, encoder, max_seq_len=cfg.max_seq_len,
                                      cache=FeatureCache(cache_dir, encoder), progress=progress,
                                      template=cfg.template or "alpaca")
    return model, dataset
