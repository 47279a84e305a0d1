"""The multi-modal LLaMA-Adapter: image-conditioned adaption prompts.

The "Multi-modal Reasoning" part of Zhang et al.'s method extends the adapter to images. A frozen
image encoder (CLIP's visual tower) gives M global features of the image {I_m}, taken at
several depths; they are concatenated and projected to the model width,

    I_p = Projection(Concat(I_1, ..., I_M))                     (1, dim)

and the projected feature is added to every position of the adaption prompt of every
adapted layer,

    P_l^v = P_l + Repeat(I_p)                                    (P, dim)

with the zero-initialized gates unchanged. The prefix keys and values are now different
for every sample: each adapted layer computes them once per forward (and once per
generation call, in the KV cache) as a (B, Hkv, P, D) prefix, which `gated_prefix_attention`
takes as it is (the fused Triton kernels on a GPU). Trainable: the prompts, the gates and
the projection; the LLaMA and the encoder stay frozen. A text-only sample gets I_p = 0,
which is the text adapter.

    encoder = ImageEncoder.from_pretrained("openai/clip-vit-large-patch14 folder")
    model = MultiModalLLaMAAdapter(LLaMAAdapter.from_hf(...), encoder)
    logits = model(tokens, images=pixel_values)        # or image_features=encoder(pixel_values)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llama_adapter_fast.models.formats.native import read_adapter_file, write_adapter_file
from llama_adapter_fast.models.llama import LLaMAAdapter
from llama_adapter_fast.models.vision import ImageEncoder, encode_image_files

PROJECTION_PREFIX = "image_projection."
ENCODER_KEY = "image_encoder"  # adapter file metadata: the encoder the projection was trained on
PROJECTION_KEY = "image_projection"
FUSION_KEY = "image_fusion"  # adapter file metadata: which adapted layers take the image
IMAGE_FUSIONS = ("all", "early")


class ImageProjection(nn.Module):
    """The paper's projection network, a small MLP as in its experiments: two linear layers
    with a GELU between, from the concatenated encoder features to the model width.
    float32 whatever the base dtype, like the prompts.

    The weights are stored at unit scale (N(0, 1)) and multiplied by 1/sqrt(fan_in) in the
    forward pass (the "equalized learning rate" of Karras et al.'s progressive GANs). Adam
    moves every weight by about the learning rate whatever its gradient, and the adapter's
    learning rate is chosen for prompts of unit scale: stored this way, the projection's
    output moves at the prompts' pace instead of sqrt(fan_in) times faster. (In the demo,
    seeds 0 to 2: 93-96% of the held-out answers right; with nn.Linear's parametrization,
    74-91% over the settings tried.)
    """

    def __init__(self, in_dim: int, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = dim if hidden is None else hidden
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"projection_hidden must be a positive int, got {hidden!r}")
        self.fc1 = nn.Linear(in_dim, hidden, dtype=torch.float32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, dtype=torch.float32)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights N(0, 1) (scaled in the forward pass), biases zero."""
        for fc in (self.fc1, self.fc2):
            nn.init.normal_(fc.weight)
            nn.init.zeros_(fc.bias)

    def config(self) -> dict[str, int]:
        return {"in_dim": self.fc1.in_features, "hidden": self.fc1.out_features, "dim": self.fc2.out_features}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = F.linear(features, self.fc1.weight * self.fc1.in_features ** -0.5, self.fc1.bias)
        return F.linear(self.act(h), self.fc2.weight * self.fc2.in_features ** -0.5, self.fc2.bias)


class MultiModalLLaMAAdapter(nn.Module):
    """A LLaMAAdapter whose adaption prompts are conditioned on an image (see the module doc).

    Holds `llama` (the LLaMAAdapter: frozen base, trainable prompts and gates),
    `image_encoder` (an ImageEncoder, frozen) and `image_projection` (trainable).

    `image_fusion` says which adapted layers take the image: "all" (the first paper, and
    every released implementation) or "early", LLaMA-Adapter V2's early fusion: only the
    lowest `early_layers` adapted layers (default: the lower half, rounded up) add the image
    to their prompts, and the layers above keep plain prompts shared by the batch. V2's
    argument: the visual prompts then shape the low layers' representations, and the top
    layers' prompts, which steer the answer's wording, are not pulled around by the
    image-text alignment. One forward then runs the fused op with per-sample prefixes
    (B, Hkv, P, D) in the early layers and shared ones (Hkv, P, D) above.
    """

    def __init__(self, llama: LLaMAAdapter, image_encoder: ImageEncoder, projection_hidden: int | None = None,
                 image_fusion: str = "all", early_layers: int | None = None):
        super().__init__()
        if not isinstance(llama, LLaMAAdapter):
            raise TypeError(f"llama must be a LLaMAAdapter, got {type(llama).__name__}")
        if not isinstance(image_encoder, ImageEncoder):
            raise TypeError(f"image_encoder must be an ImageEncoder, got {type(image_encoder).__name__}")
        if llama.args.adapter_layers == 0:
            raise ValueError("llama: the multi-modal adapter needs adapter layers (adapter_layers = 0)")
        self.llama = llama
        self.image_encoder = image_encoder
        device = llama.tok_embeddings.weight.device
        if device.type == "meta":
            device = torch.device("cpu")
        adapted = llama.adapter_layers()  # bottom to top
        if image_fusion not in IMAGE_FUSIONS:
            raise ValueError(f"image_fusion must be one of {IMAGE_FUSIONS}, got {image_fusion!r}")
        if image_fusion == "all":
            if early_layers is not None:
                raise ValueError("early_layers: only with image_fusion='early'")
            early_layers = len(adapted)
        elif early_layers is None:
            early_layers = (len(adapted) + 1) // 2
        if isinstance(early_layers, bool) or not isinstance(early_layers, int) or not (
                1 <= early_layers < len(adapted) or image_fusion == "all"):
            raise ValueError(f"early_layers must be an int in [1, {len(adapted) - 1}] (the model has {len(adapted)} "
                             f"adapted layers; early fusion keeps one or more without the image), got "
                             f"{early_layers!r}")
        for i, attention in enumerate(adapted):
            attention.takes_prompt_offset = i < early_layers
        self.image_fusion, self.early_layers = image_fusion, early_layers
        self.image_projection = ImageProjection(image_encoder.feature_dim, llama.args.dim, projection_hidden).to(device)
        self.freeze_base()

    @property
    def args(self):
        return self.llama.args

    @property
    def tok_embeddings(self) -> nn.Embedding:
        """Its LLaMA's word embeddings (their device and dtype are the model's)."""
        return self.llama.tok_embeddings

    # -- parameters -------------------------------------------------------------------------

    def freeze_base(self) -> None:
        """Only the prompts, the gates and the projection train."""
        self.llama.freeze_base()
        self.image_encoder.requires_grad_(False)
        self.image_projection.requires_grad_(True)

    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        self.llama.reset_adapter(generator)
        self.image_projection.reset_parameters()

    def adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name in the adapter file, parameter) of every trainable tensor."""
        return self.llama.adapter_parameters() + [
            (PROJECTION_PREFIX + n, p) for n, p in self.image_projection.named_parameters()]

    def num_adapter_parameters(self) -> int:
        return sum(p.numel() for _, p in self.adapter_parameters())

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.adapter_parameters()}

    def train(self, mode: bool = True) -> MultiModalLLaMAAdapter:
        super().train(mode)
        self.image_encoder.train(False)
        return self

    # -- forward ----------------------------------------------------------------------------

    def prompt_offset(self, *, images: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                      image_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """I_p (B, dim) from pixel values (B, 3, H, W) or encoder features (B, feature_dim);
        rows where image_mask (B,) is False (text-only samples) are 0. None without images."""
        if images is not None and image_features is not None:
            raise ValueError("pass images or image_features, not both")
        if images is not None:
            image_features = self.image_encoder(images)
        if image_features is None:
            if image_mask is not None:
                raise ValueError("image_mask needs images or image_features")
            return None
        want = self.image_encoder.feature_dim
        if image_features.dim() != 2 or image_features.shape[1] != want:
            enc = self.image_encoder
            raise ValueError(f"image_features must have shape (B, {want}) (the encoder's {len(enc.layers)} layers x "
                             f"{enc.tower.config.hidden_size}), got {tuple(image_features.shape)}")
        weight = self.image_projection.fc1.weight
        offset = self.image_projection(image_features.to(device=weight.device, dtype=weight.dtype))
        if image_mask is not None:
            if image_mask.shape != offset.shape[:1]:
                raise ValueError(f"image_mask must have shape ({offset.shape[0]},), got {tuple(image_mask.shape)}")
            offset = offset * image_mask.to(device=offset.device, dtype=offset.dtype)[:, None]
        return offset

    def forward(self, tokens: torch.Tensor, *, images: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                last_only: bool = False, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        """Logits (B, T, vocab). `images` are pixel values (the encoder runs, without
        gradient); `image_features` are the encoder's features computed beforehand (training
        reads them from the feature cache). Without either, the text adapter. Packed records
        (cu_seqlens, max_seqlen: see `LLaMAAdapter.forward`) take one image row per record."""
        offset = self.prompt_offset(images=images, image_features=image_features, image_mask=image_mask)
        return self.llama(tokens, positions=positions, key_padding_mask=key_padding_mask, last_only=last_only,
                          cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, prompt_offset=offset)

    # -- generation -------------------------------------------------------------------------

    def features_of(self, images: Sequence[Any], progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N, feature_dim), mask (N,)) for a list of image paths, Pillow images or None."""
        features = torch.zeros(len(images), self.image_encoder.feature_dim)
        mask = torch.tensor([image is not None for image in images], dtype=torch.bool)
        paths = [(i, im) for i, im in enumerate(images) if isinstance(im, (str, os.PathLike))]
        pils = [(i, im) for i, im in enumerate(images) if im is not None and not isinstance(im, (str, os.PathLike))]
        if paths:
            features[[i for i, _ in paths]] = encode_image_files(self.image_encoder, [p for _, p in paths],
                                                                 progress=progress)
        if pils:
            features[[i for i, _ in pils]] = self.image_encoder.encode([im for _, im in pils])
        return features, mask

    @torch.no_grad()
    def answer_offsets(self, instructions: Sequence[str | dict], *, images: Sequence[Any] | None = None,
                       image_features: torch.Tensor | None = None) -> torch.Tensor | None:
        """The prompt offsets (N, dim) of instructions, each with its image: `images` (paths,
        Pillow images, or None for no image), or `image_features` (N, feature_dim), or the
        "image" key of record instructions (a path)."""
        if image_features is None:
            if images is None:
                images = [item.get("image") if isinstance(item, dict) else None for item in instructions]
            if len(images) != len(instructions):
                raise ValueError(f"images: {len(images)} for {len(instructions)} instructions")
            image_features, mask = self.features_of(images)
        else:
            mask = torch.ones(len(instructions), dtype=torch.bool)
        return self.prompt_offset(image_features=image_features, image_mask=mask)

    # -- adapter files ----------------------------------------------------------------------

    def save_adapter(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
                     tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Prompts, gates and projection (float32) in a .safetensors file, with the adapter
        config, the projection's shape and the encoder's record (config, SHA-256 of its
        weights, feature layers, preprocessing), written atomically."""
        if tensors is None:
            tensors = self.adapter_state_dict()
        else:  # a state dict of this module (names under llama. and image_projection.)
            tensors = {n.removeprefix("llama."): t for n, t in tensors.items()}
        meta = {PROJECTION_KEY: json.dumps(self.image_projection.config()),
                ENCODER_KEY: json.dumps(self.image_encoder.record()),
                FUSION_KEY: json.dumps({"mode": self.image_fusion, "early_layers": self.early_layers}),
                **(metadata or {})}
        write_adapter_file(path, tensors, self.llama.args.adapter_config(), meta)

    def check_encoder(self, recorded: Mapping[str, Any], source: str) -> None:
        """A ValueError unless `recorded` (an adapter file's encoder record) describes this encoder."""
        own = self.image_encoder.record()
        diffs = [key for key in ("weights_sha256", "config", "layers", "preprocessor") if recorded.get(key) != own[key]]
        if diffs:
            raise ValueError(
                f"{source}: this adapter was trained with another image encoder ({', '.join(diffs)} differ): it "
                f"recorded {recorded.get('source')} with weights sha256 {str(recorded.get('weights_sha256'))[:12]}…, "
                f"layers {recorded.get('layers')}; the encoder given is {own['source']} with weights sha256 "
                f"{own['weights_sha256'][:12]}…, layers {own['layers']}. Pass the encoder it was trained with "
                f"(--image-encoder).")

    def load_adapter(self, path: str | os.PathLike) -> None:
        """Load prompts, gates and projection from a file written by `save_adapter`, after
        checking that it was trained with this model's image encoder."""
        record = read_image_adapter_record(path)
        if record is None:
            raise ValueError(f"{path}: not a multi-modal adapter (no image encoder recorded): load it into a "
                             f"LLaMAAdapter")
        self.check_encoder(record, str(path))
        state = read_adapter_file(path)
        projection = {n.removeprefix(PROJECTION_PREFIX): t for n, t in state.items() if n.startswith(PROJECTION_PREFIX)}
        own = dict(self.image_projection.named_parameters())
        if set(projection) != set(own) or any(projection[n].shape != p.shape for n, p in own.items()):
            shapes = {n: tuple(t.shape) for n, t in projection.items()}
            raise ValueError(f"{path}: the image projection {shapes} does not fit this model "
                             f"({ {n: tuple(p.shape) for n, p in own.items()} })")
        self.llama.load_adapter({n: t for n, t in state.items() if not n.startswith(PROJECTION_PREFIX)})
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(projection[name])


def read_image_adapter_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The encoder record of a multi-modal adapter file; None for a text adapter file."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta[ENCODER_KEY]) if ENCODER_KEY in meta else None


def read_projection_config(path: str | os.PathLike) -> dict[str, int]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})[PROJECTION_KEY])


def read_image_fusion(path: str | os.PathLike) -> dict[str, Any]:
    """image_fusion and early_layers of a multi-modal adapter file (files that do not record
    them were trained with the image in every adapted layer)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        recorded = (f.metadata() or {}).get(FUSION_KEY)
    if recorded is None:
        return {"image_fusion": "all", "early_layers": None}
    fusion = json.loads(recorded)
    mode = fusion.get("mode")
    return {"image_fusion": mode, "early_layers": fusion.get("early_layers") if mode == "early" else None}


def image_encoder_folder(adapter: str | os.PathLike, image_encoder: str | None, record: Mapping[str, Any]) -> str:
    """The encoder folder of a multi-modal adapter: `image_encoder` where given (as
    --image-encoder), else the folder the file recorded; a ValueError saying which one is
    not a folder here."""
    if image_encoder is not None:
        if not Path(image_encoder).is_dir():
            raise ValueError(f"--image-encoder {image_encoder} is not a folder (a Hugging Face CLIP folder)")
        return image_encoder
    folder = record.get("source")
    if not folder or not Path(folder).is_dir():
        raise ValueError(f"{adapter}: the image encoder it recorded, {folder!r}, is not a folder here: pass the "
                         f"encoder it was trained with (--image-encoder)")
    return folder


def load_image_adapter(llama: LLaMAAdapter, adapter: str | os.PathLike, *, image_encoder: str | None = None,
                       device: torch.device | str | None = None) -> MultiModalLLaMAAdapter:
    """A MultiModalLLaMAAdapter around `llama` (built with the file's adapter config) with the
    adapter of a multi-modal file. The encoder is `image_encoder` (a CLIP folder) or the
    folder the file recorded; either way it must be the one the adapter was trained with."""
    record = read_image_adapter_record(adapter)
    if record is None:
        raise ValueError(f"{adapter}: a text adapter has no image projection: drop --image-encoder and images")
    folder = image_encoder_folder(adapter, image_encoder, record)
    encoder = ImageEncoder.from_pretrained(folder, device=device)
    layers, depth = record.get("layers") or [], encoder.config.num_hidden_layers
    if any(not 1 <= i <= depth for i in layers):
        recorded = record.get("config", {}).get("num_hidden_layers", "?")
        raise ValueError(f"{adapter}: this adapter was trained with another image encoder: it reads layers {layers} "
                         f"of a {recorded}-layer tower ({record.get('source')}); {folder} has {depth} layers. Pass the "
                         f"encoder it was trained with (--image-encoder).")
    encoder = ImageEncoder(encoder.tower, encoder.processor, layers, encoder.source)
    model = MultiModalLLaMAAdapter(llama, encoder, read_projection_config(adapter)["hidden"],
                                   **read_image_fusion(adapter))
    model.load_adapter(adapter)
    return model
