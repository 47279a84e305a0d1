"""The image side of the multi-modal LLaMA-Adapter: a frozen CLIP vision tower, its
preprocessing, and its features cached on disk.

- `ImageEncoder`: transformers' `CLIPVisionModel`, loaded from any Hugging Face CLIP folder
  (a `CLIPVisionModel`, a `CLIPVisionModelWithProjection`, or a whole `CLIPModel`, whose text
  tower is not read), with the folder's image processor (transformers' Pillow backend,
  which needs no torchvision); an image becomes the global features ([CLS] token) of
  several layers, each standardized, concatenated.
- `FeatureCache`, `image_file_digests` and `encode_image_files`: features on disk, keyed by
  the image file's content hash and the encoder's fingerprint, so a data set is encoded once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llama_adapter_fast.files import atomic_write, file_sha256, first_line

# The fields of a CLIPVisionConfig that shape the tower's features (an adapter file records them).
CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                 "image_size", "patch_size", "hidden_act", "layer_norm_eps")


class ImageError(ValueError):
    """An image that cannot be read or decoded; the message names the file."""


# Files whose size Pillow has warned about once already (it warns at every open).
_LARGE_WARNED: set[str] = set()


def load_image(path: str | os.PathLike):
    """An RGB Pillow image, fully decoded (a truncated or corrupt file fails here, with its
    path; so does one over Pillow's decompression-bomb limit). A large picture under the
    limit gets Pillow's warning once, naming the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise ImageError(f"image {path} is a folder, not a picture")
    if not path.is_file():
        raise ImageError(f"image {path} does not exist")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                rgb = image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image {path} is over Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} pixels per picture "
                         f"(a decompression bomb?): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"image {path} is not an image file Pillow can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise ImageError(f"image {path} cannot be decoded ({exc})") from exc
    for warning in caught:
        if issubclass(warning.category, Image.DecompressionBombWarning):
            if str(path.resolve()) not in _LARGE_WARNED:
                _LARGE_WARNED.add(str(path.resolve()))
                warnings.warn(f"image {path}: {warning.message}", Image.DecompressionBombWarning, stacklevel=2)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return rgb


def image_processor(folder: str | os.PathLike | None = None, image_size: int = 224):
    """transformers' CLIP image processor with the Pillow backend (transformers 5 names it
    CLIPImageProcessorPil; before, CLIPImageProcessor was that one): the folder's
    preprocessor_config.json, or CLIP's defaults at `image_size`."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as Processor
    if folder is None:
        return Processor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    if not (Path(folder) / "preprocessor_config.json").is_file():
        raise ValueError(f"image encoder: {folder} has no preprocessor_config.json")
    return Processor.from_pretrained(str(folder))


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' loading report and progress bar, silenced (the loader checks the keys itself)."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()


def load_vision_tower(folder: str | os.PathLike):
    """transformers' CLIPVisionModel from a Hugging Face CLIP folder (its own, a
    CLIPVisionModelWithProjection's, or a CLIPModel's vision tower), in the checkpoint's
    dtype. A folder that is not one, or whose weights do not fill the tower, is a ValueError."""
    from transformers import CLIPVisionModel

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"image encoder: {folder} has no config.json (expected a Hugging Face CLIP folder)")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"image encoder: {folder}/config.json is not a JSON object ({first_line(exc)})") from None
    if model_type not in ("clip", "clip_vision_model"):
        raise ValueError(f"image encoder: {folder} is not a CLIP folder (model_type {model_type!r})")
    try:
        with _quiet_transformers():
            tower, info = CLIPVisionModel.from_pretrained(str(folder), output_loading_info=True, dtype="auto")
    except Exception as exc:  # transformers and huggingface_hub fail in their own ways
        raise ValueError(f"image encoder: {folder} cannot be read as a CLIP vision tower ({first_line(exc)})") from None
    missing = sorted(info.get("missing_keys", []))
    mismatched = sorted(str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys", []))
    if missing or mismatched:
        raise ValueError(f"image encoder: {folder}: the weights do not match its config.json: missing {missing[:4]}, "
                         f"of another shape {mismatched[:4]}")
    return tower


def default_feature_layers(num_layers: int, count: int = 4) -> list[int]:
    """`count` layers evenly spaced through the tower, ending with the last: 3, 6, 9, 12 of
    ViT-B's 12, 6, 12, 18, 24 of ViT-L's 24."""
    count = min(count, num_layers)
    return sorted({round(num_layers * (i + 1) / count) for i in range(count)})


class ImageEncoder(nn.Module):
    """A frozen CLIP vision tower (transformers' CLIPVisionModel) and its image processor.

    An image's feature is the concatenation, over `layers`, of the [CLS] token of that
    layer (the ViT's global feature at that depth), each standardized by a layer norm
    without parameters: shallow layers keep colour, position and count, deep ones the
    abstractions, and the standardization puts layers of very different norms on one
    scale for the projection that follows. Shape (N, len(layers) * hidden_size), float32.
    """

    def __init__(self, tower: nn.Module, processor: Any | None = None, layers: Sequence[int] | None = None,
                 source: str | None = None):
        super().__init__()
        n = tower.config.num_hidden_layers
        layers = list(layers) if layers is not None else default_feature_layers(n)
        if not layers or any(isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= n for i in layers):
            raise ValueError(f"image layers must be a non-empty list of layer numbers in [1, {n}], got {layers}")
        self.tower = tower.requires_grad_(False).eval()
        self.processor = processor or image_processor(image_size=tower.config.image_size)
        self.layers = layers
        self.source = source
        self._weights_sha256: tuple[tuple, str] | None = None  # (state of the tensors, hash)

    @property
    def config(self):
        return self.tower.config

    @property
    def feature_dim(self) -> int:
        return len(self.layers) * self.config.hidden_size

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, layers: Sequence[int] | None = None,
                        device: torch.device | str | None = None) -> ImageEncoder:
        tower = load_vision_tower(folder)
        if device is not None:
            tower = tower.to(device)
        # Recorded absolute, so that an adapter file names its encoder from any working directory.
        return cls(tower, image_processor(folder), layers, source=str(Path(folder).resolve()))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """The tower and the image processor, as transformers writes them."""
        self.tower.save_pretrained(str(folder))
        self.processor.save_pretrained(str(folder))

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
        config = {k: getattr(self.config, k) for k in CONFIG_FIELDS}
        processor = {k: v for k, v in self.processor.to_dict().items() if not k.startswith("_")}
        return {"config": config, "weights_sha256": self.weights_sha256(), "layers": list(self.layers),
                "preprocessor": json.loads(json.dumps(processor, default=str)), "source": self.source}

    def fingerprint(self) -> str:
        """A short key of everything the features depend on (for the feature cache)."""
        record = {k: v for k, v in self.record().items() if k != "source"}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]

    # -- features ---------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features (N, feature_dim) float32 of pixel values (N, 3, H, W)."""
        size, channels = self.config.image_size, self.config.num_channels
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (channels, size, size):
            raise ValueError(f"images must be pixel values of shape (N, {channels}, {size}, {size}), "
                             f"got {tuple(pixel_values.shape)}")
        weight = next(self.tower.parameters())
        out = self.tower(pixel_values=pixel_values.to(weight.device, weight.dtype), output_hidden_states=True)
        # hidden_states[i] is the output of block i (0: the embeddings after the pre-layer norm).
        states = out.hidden_states
        return torch.cat([F.layer_norm(states[i][:, 0].float(), (states[i].shape[-1],)) for i in self.layers],
                         dim=-1)

    def encode(self, images: Sequence) -> torch.Tensor:
        """Features of Pillow images."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        size = self.config.image_size
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
