"""CLIP's vision tower, the image side of the multi-modal LLaMA-Adapter.

- `CLIPVisionTower`: the ViT of CLIP, with Hugging Face's parameter names, loaded from any
  Hugging Face CLIP folder: a `CLIPVisionModel`, a `CLIPVisionModelWithProjection`, or a
  whole `CLIPModel` (its text tower is not read).
- `ImagePreprocessor`: what preprocessor_config.json asks for (resize of the shortest
  edge, center crop, rescale, normalize), done with Pillow and numpy. transformers' image
  processors are not used: their default backend needs torchvision, which does not install
  beside every torch build. The steps are those of transformers' Pillow backend, so the
  pixels agree with it (tests/test_multimodal.py checks this).
- `ImageEncoder`: the frozen tower and its preprocessing; an image becomes the global
  features ([CLS] token) of several layers, each standardized, concatenated.
- `FeatureCache`, `image_file_digests` and `encode_image_files`: features on disk, keyed by
  the image file's content hash and the encoder's fingerprint, so a data set is encoded once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llama_adapter_fast.model import atomic_write, file_sha256

# OpenAI CLIP's normalization, the default of CLIP's preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI's CLIP
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class ImageError(ValueError):
    """An image that cannot be read or decoded; the message names the file."""


# ----------------------------------------------------------------------------------------
# The tower


@dataclass
class CLIPVisionConfig:
    """The fields of Hugging Face's CLIPVisionConfig that shape the tower."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # set when the folder has visual_projection (WithProjection, CLIPModel)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_channels", "image_size", "patch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CLIP vision config: {name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIP vision config: hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIP vision config: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP vision config: hidden_act must be one of {sorted(ACTIVATIONS)}, "
                             f"got {self.hidden_act!r}")

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> CLIPVisionConfig:
        """From a config.json dict: a CLIPVisionConfig, or a CLIPConfig (its vision_config)."""
        vision = config.get("vision_config") or config
        if not isinstance(vision, Mapping) or "hidden_size" not in vision:
            raise ValueError(f"config: not a CLIP vision config (model_type {config.get('model_type')!r})")
        fields = {f.name for f in dataclasses.fields(cls)} - {"projection_dim"}
        kwargs = {k: vision[k] for k in fields if k in vision}
        # A CLIPModel's projection size is its top-level projection_dim (its vision_config
        # carries transformers' default of 512 whatever the projection is).
        if vision is config:
            projection = vision.get("projection_dim")
        else:
            projection = config.get("projection_dim", vision.get("projection_dim"))
        return cls(**kwargs, projection_dim=projection)

    def to_hf(self, with_projection: bool) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "projection_dim"}
        arch = "CLIPVisionModelWithProjection" if with_projection else "CLIPVisionModel"
        out.update(model_type="clip_vision_model", architectures=[arch], initializer_factor=1.0,
                   initializer_range=0.02, attention_dropout=0.0)
        if with_projection:
            out["projection_dim"] = self.projection_dim
        return out


class CLIPAttention(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.n_heads = c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape

        def heads(t):
            return t.view(B, N, self.n_heads, C // self.n_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(B, N, C))


class CLIPMLP(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = CLIPAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False)
        self.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2 + 1, c.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPEncoder(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c.num_hidden_layers))


class CLIPVisionTower(nn.Module):
    """CLIP's ViT. Parameter names are those of Hugging Face's CLIPVisionModel without the
    `vision_model.` prefix (and `visual_projection` when the checkpoint has one)."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: Hugging Face's name
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.visual_projection = (nn.Linear(config.hidden_size, config.projection_dim, bias=False)
                                  if config.projection_dim else None)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """CLIP's initialization (transformers' CLIPPreTrainedModel._init_weights, factor 1)."""
        c = self.config
        width, depth = c.hidden_size, c.num_hidden_layers

        def normal(p, std):
            with torch.no_grad():
                if p.device.type != "meta":
                    p.copy_(torch.randn(p.shape, generator=generator) * std)

        normal(self.embeddings.class_embedding, width ** -0.5)
        normal(self.embeddings.patch_embedding.weight, 0.02)
        normal(self.embeddings.position_embedding.weight, 0.02)
        for layer in self.encoder.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                normal(proj.weight, width ** -0.5 * (2 * depth) ** -0.5)
            normal(layer.self_attn.out_proj.weight, width ** -0.5)
            normal(layer.mlp.fc1.weight, width ** -0.5 * (2 * depth) ** -0.5)
            normal(layer.mlp.fc2.weight, (2 * width) ** -0.5)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.visual_projection is not None:
            normal(self.visual_projection.weight, width ** -0.5)

    def hidden_states(self, pixel_values: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """[embeddings after pre_layrnorm, output of layer 1, ..., output of layer `upto`]:
        the `hidden_states` of transformers' CLIPVisionModel (index i = after block i)."""
        upto = self.config.num_hidden_layers if upto is None else upto
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        out = [x]
        for layer in self.encoder.layers[:upto]:
            x = layer(x)
            out.append(x)
        return out

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pooled image embedding: post_layernorm of the last [CLS] token, then the visual
        projection when there is one (CLIP's image embedding)."""
        pooled = self.post_layernorm(self.hidden_states(pixel_values)[-1][:, 0])
        return self.visual_projection(pooled) if self.visual_projection is not None else pooled

    # -- Hugging Face folders --------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> CLIPVisionTower:
        """From a Hugging Face folder: config.json and safetensors weights of a CLIPVisionModel,
        a CLIPVisionModelWithProjection or a CLIPModel. Tensors keep the checkpoint's dtype."""
        folder = Path(folder)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ValueError(f"image encoder: {folder} has no config.json (expected a Hugging Face CLIP folder)")
        raw = json.loads(config_path.read_text())
        state = _read_vision_tensors(folder)
        has_projection = "visual_projection.weight" in state
        config = CLIPVisionConfig.from_hf(raw)
        if not has_projection:
            config.projection_dim = None
        elif config.projection_dim is None:
            config.projection_dim = state["visual_projection.weight"].shape[0]
        with torch.device("meta"):
            tower = cls(config)
        expected = dict(tower.named_parameters())
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"image encoder: {folder}: the weights do not match its config.json: missing "
                             f"{missing[:4]}, unexpected {unexpected[:4]}")
        for name, p in expected.items():
            if state[name].shape != p.shape:
                raise ValueError(f"image encoder: {folder}: {name} has shape {tuple(state[name].shape)}, "
                                 f"config.json implies {tuple(p.shape)}")
        tower.load_state_dict(state, assign=True)
        return tower

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json and model.safetensors that transformers' CLIPVisionModel (or
        CLIPVisionModelWithProjection) and `from_pretrained` read."""
        from safetensors.torch import save_file

        folder = Path(folder)
        state = {}
        for name, p in self.state_dict().items():
            key = name if name.startswith("visual_projection.") else f"vision_model.{name}"
            state[key] = p.detach().cpu().contiguous()
        atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        config = self.config.to_hf(with_projection=self.visual_projection is not None)
        atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


TOWER_KEYS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")


def _read_vision_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The vision tower's tensors of a folder's safetensors files, renamed to the tower's
    names (the text tower of a whole CLIPModel is not read)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"image encoder: {folder} has no .safetensors weights")
    state = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                if key.endswith("position_ids"):
                    continue
                if key.startswith("vision_model."):  # CLIPModel, and CLIPVisionModel before transformers 5
                    state[key.removeprefix("vision_model.")] = f.get_tensor(key)
                elif key.startswith(TOWER_KEYS) or key == "visual_projection.weight":  # transformers 5
                    state[key] = f.get_tensor(key)
    if not state:
        raise ValueError(f"image encoder: {folder}: no CLIP vision tensors (not a CLIP checkpoint?)")
    return state


# ----------------------------------------------------------------------------------------
# Preprocessing


def load_image(path: str | os.PathLike):
    """An RGB Pillow image, fully decoded (a truncated or corrupt file fails here, with its path)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except UnidentifiedImageError as exc:
        raise ImageError(f"image {path} is not an image file Pillow can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise ImageError(f"image {path} cannot be decoded ({exc})") from exc


def _size_dict(value: Any, what: str) -> dict[str, int]:
    if isinstance(value, int):
        return {"height": value, "width": value} if what == "crop_size" else {"shortest_edge": value}
    if isinstance(value, Mapping) and ("shortest_edge" in value or {"height", "width"} <= set(value)):
        return {k: int(v) for k, v in value.items() if k in ("shortest_edge", "height", "width")}
    raise ValueError(f"preprocessor_config.json: {what} must be an int, {{'shortest_edge'}} or "
                     f"{{'height', 'width'}}, got {value!r}")


@dataclass
class ImagePreprocessor:
    """preprocessor_config.json's steps: RGB, resize (bicubic by default) so that the shortest
    edge is `size["shortest_edge"]` (or to height x width), center crop, x / 255, (x - mean) / std."""

    size: dict = dataclasses.field(default_factory=lambda: {"shortest_edge": 224})
    crop_size: dict = dataclasses.field(default_factory=lambda: {"height": 224, "width": 224})
    resample: int = 3  # PIL.Image.BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> ImagePreprocessor:
        kwargs = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config}
        if "size" in kwargs:
            kwargs["size"] = _size_dict(kwargs["size"], "size")
        if "crop_size" in kwargs:
            kwargs["crop_size"] = _size_dict(kwargs["crop_size"], "crop_size")
        for key in ("image_mean", "image_std"):
            if key in kwargs:
                kwargs[key] = tuple(float(x) for x in kwargs[key])
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> ImagePreprocessor:
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            raise ValueError(f"image encoder: {folder} has no preprocessor_config.json")
        return cls.from_dict(json.loads(path.read_text()))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(image_mean=list(self.image_mean), image_std=list(self.image_std), do_convert_rgb=True,
                   image_processor_type="CLIPImageProcessor")
        return out

    def _resized(self, width: int, height: int) -> tuple[int, int]:
        if "shortest_edge" in self.size:
            short, long = sorted((width, height))
            new_short, new_long = self.size["shortest_edge"], int(self.size["shortest_edge"] * long / short)
            return (new_short, new_long) if width <= height else (new_long, new_short)
        return self.size["width"], self.size["height"]

    def __call__(self, images: Sequence) -> torch.Tensor:
        """(N, 3, H, W) float32 pixel values for Pillow images."""
        return torch.stack([self._one(image) for image in images])

    def _one(self, image) -> torch.Tensor:
        image = image.convert("RGB")
        if self.do_resize:
            image = image.resize(self._resized(*image.size), resample=self.resample)
        x = np.asarray(image)
        if self.do_center_crop:
            x = _center_crop(x, self.crop_size["height"], self.crop_size["width"])
        x = x.astype(np.float32)
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def _center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop (H, W, C) to its center; an image smaller than the crop is padded with zeros."""
    h, w = x.shape[:2]
    if h < height or w < width:
        padded = np.zeros((max(h, height), max(w, width), x.shape[2]), dtype=x.dtype)
        top, left = math.ceil((padded.shape[0] - h) / 2), math.ceil((padded.shape[1] - w) / 2)
        padded[top:top + h, left:left + w] = x
        x, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - height) // 2, (w - width) // 2
    return x[top:top + height, left:left + width]


# ----------------------------------------------------------------------------------------
# Features


def default_feature_layers(num_layers: int, count: int = 4) -> list[int]:
    """`count` layers evenly spaced through the tower, ending with the last: 3, 6, 9, 12 of
    ViT-B's 12, 6, 12, 18, 24 of ViT-L's 24."""
    count = min(count, num_layers)
    return sorted({round(num_layers * (i + 1) / count) for i in range(count)})


class ImageEncoder(nn.Module):
    """A frozen CLIP vision tower and its preprocessing.

    An image's feature is the concatenation, over `layers`, of the [CLS] token of that
    layer (the ViT's global feature at that depth), each standardized by a layer norm
    without parameters: shallow layers keep colour, position and count, deep ones the
    abstractions, and the standardization puts layers of very different norms on one
    scale for the projection that follows. Shape (N, len(layers) * hidden_size), float32.
    """

    def __init__(self, tower: CLIPVisionTower, preprocessor: ImagePreprocessor | None = None,
                 layers: Sequence[int] | None = None, source: str | None = None):
        super().__init__()
        n = tower.config.num_hidden_layers
        layers = list(layers) if layers is not None else default_feature_layers(n)
        if not layers or any(isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= n for i in layers):
            raise ValueError(f"image layers must be a non-empty list of layer numbers in [1, {n}], got {layers}")
        self.tower = tower.requires_grad_(False).eval()
        self.preprocessor = preprocessor or ImagePreprocessor(
            size={"shortest_edge": tower.config.image_size},
            crop_size={"height": tower.config.image_size, "width": tower.config.image_size})
        self.layers = layers
        self.source = source
        self._weights_sha256: tuple[tuple, str] | None = None  # (state of the tensors, hash)

    @property
    def feature_dim(self) -> int:
        return len(self.layers) * self.tower.config.hidden_size

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, layers: Sequence[int] | None = None,
                        device: torch.device | str | None = None) -> ImageEncoder:
        tower = CLIPVisionTower.from_pretrained(folder)
        if device is not None:
            tower = tower.to(device)
        # Recorded absolute, so that an adapter file names its encoder from any working directory.
        return cls(tower, ImagePreprocessor.from_pretrained(folder), layers, source=str(Path(folder).resolve()))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        self.tower.save_pretrained(folder)
        config = self.preprocessor.to_dict()
        atomic_write(Path(folder) / "preprocessor_config.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))

    def train(self, mode: bool = True) -> ImageEncoder:
        super().train(mode)
        self.tower.eval()  # frozen: always in inference mode
        return self

    # -- identity ---------------------------------------------------------------------------

    def weights_sha256(self) -> str:
        """SHA-256 over the tower's tensors (names, dtypes, shapes, bytes): the same weights
        give the same hash whatever file layout they came from."""
        tensors = sorted(self.tower.state_dict().items())
        # Hashing reads every byte, so the hash is kept while no tensor was replaced (a data
        # pointer, a dtype) or written in place (its version counter).
        state = tuple((name, t.data_ptr(), t.dtype, t._version) for name, t in tensors)
        if self._weights_sha256 is None or self._weights_sha256[0] != state:
            h = hashlib.sha256()
            for name, t in tensors:
                t = t.detach().cpu().contiguous()
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._weights_sha256 = (state, h.hexdigest())
        return self._weights_sha256[1]

    def record(self) -> dict[str, Any]:
        """What an adapter file keeps about the encoder it was trained with."""
        return {"config": dataclasses.asdict(self.tower.config), "weights_sha256": self.weights_sha256(),
                "layers": list(self.layers), "preprocessor": self.preprocessor.to_dict(), "source": self.source}

    def fingerprint(self) -> str:
        """A short key of everything the features depend on (for the feature cache)."""
        record = {k: v for k, v in self.record().items() if k != "source"}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]

    # -- features ---------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features (N, feature_dim) float32 of pixel values (N, 3, H, W)."""
        size = self.tower.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (self.tower.config.num_channels, size, size):
            raise ValueError(f"images must be pixel values of shape (N, {self.tower.config.num_channels}, {size}, "
                             f"{size}), got {tuple(pixel_values.shape)}")
        device = self.tower.embeddings.patch_embedding.weight.device
        states = self.tower.hidden_states(pixel_values.to(device), upto=max(self.layers))
        return torch.cat([F.layer_norm(states[i][:, 0].float(), (states[i].shape[-1],)) for i in self.layers],
                         dim=-1)

    def encode(self, images: Sequence) -> torch.Tensor:
        """Features of Pillow images."""
        pixels = self.preprocessor(images)
        size = self.tower.config.image_size
        if tuple(pixels.shape[2:]) != (size, size):
            raise ValueError(f"preprocessor_config.json gives {tuple(pixels.shape[2:])} pixels, the tower takes "
                             f"{size} x {size}")
        return self(pixels).cpu()


class FeatureCache:
    """Encoder features on disk: <folder>/<encoder fingerprint>/<image sha256>.safetensors,
    each written atomically (several processes may fill the same cache)."""

    def __init__(self, folder: str | os.PathLike, encoder: ImageEncoder):
        self.folder = Path(folder) / encoder.fingerprint()

    def _path(self, digest: str) -> Path:
        return self.folder / f"{digest}.safetensors"

    def get(self, digest: str) -> torch.Tensor | None:
        path = self._path(digest)
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        return load_file(str(path))["features"]

    def put(self, digest: str, features: torch.Tensor) -> None:
        from safetensors.torch import save_file

        tensors = {"features": features.detach().float().cpu().contiguous()}
        atomic_write(self._path(digest), lambda tmp: save_file(tensors, tmp))


def image_file_digests(paths: Sequence[str | os.PathLike], where: Sequence[str] | None = None) -> list[str]:
    """SHA-256 of each image file's bytes (what the feature cache is keyed by); a missing or
    unreadable file is an ImageError, prefixed by `where[i]`."""
    digests = []
    for i, path in enumerate(paths):
        prefix = f"{where[i]}: " if where else ""
        if not Path(path).is_file():
            raise ImageError(f"{prefix}image {path} does not exist")
        try:
            digests.append(file_sha256(path))
        except OSError as exc:
            raise ImageError(f"{prefix}image {path} cannot be read ({exc.strerror or exc})") from exc
    return digests


def encode_image_files(encoder: ImageEncoder, paths: Sequence[str | os.PathLike], *,
                       cache: FeatureCache | None = None, batch_size: int = 64, progress: bool = True,
                       where: Sequence[str] | None = None, digests: Sequence[str] | None = None) -> torch.Tensor:
    """Features (N, feature_dim) of image files, each distinct file content encoded once and
    looked up in `cache` first. `where[i]` prefixes the error of a bad image i (for example
    "data.jsonl: record 12"); `digests` are the files' `image_file_digests` if known."""
    from tqdm.auto import tqdm

    digests = image_file_digests(paths, where) if digests is None else list(digests)
    features: dict[str, torch.Tensor] = {}
    todo: dict[str, int] = {}  # digest -> first index with that content
    for i, digest in enumerate(digests):
        if digest in features or digest in todo:
            continue
        cached = cache.get(digest) if cache is not None else None
        if cached is not None and cached.shape == (encoder.feature_dim,):
            features[digest] = cached
        else:
            todo[digest] = i
    pending = list(todo.items())
    with tqdm(total=len(pending), desc="image features", disable=not progress or not pending) as bar:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start:start + batch_size]
            images = []
            for _, i in chunk:
                try:
                    images.append(load_image(paths[i]))
                except ImageError as exc:
                    raise ImageError(f"{where[i]}: {exc}" if where else str(exc)) from exc
            out = encoder.encode(images)
            for (digest, _), row in zip(chunk, out, strict=True):
                features[digest] = row.clone()
                if cache is not None:
                    cache.put(digest, row)
            bar.update(len(chunk))
    if not digests:
        return torch.zeros(0, encoder.feature_dim)
    return torch.stack([features[d] for d in digests])
