"""The multi-modal LLaMA-Adapter: the per-sample prefix through the fused kernel, the model
against an eager reference written from the paper's equations, zero gates, frozen weights,
generation, image swaps, the CLIP tower and preprocessing against transformers, the feature
cache, data and encoder errors, fine-tuning, and the bundled pictures."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama_adapter_fast.bundled import SHAPES_DIR
from llama_adapter_fast.generation import generate
from llama_adapter_fast.kernels.utils import LAUNCH_COUNTS
from llama_adapter_fast.models import llama as model_module
from llama_adapter_fast.models.config import ModelArgs
from llama_adapter_fast.models.llama import LLaMAAdapter
from llama_adapter_fast.models.multimodal import MultiModalLLaMAAdapter
from llama_adapter_fast.models.rope import apply_rotary, rope_cos_sin
from llama_adapter_fast.models.vision import (
    FeatureCache,
    ImageEncoder,
    ImageError,
    default_feature_layers,
    load_image,
)
from llama_adapter_fast.training.multimodal import ImageInstructionDataset
from llama_adapter_fast.training.tokenizer import Tokenizer

from support.tiny_clip import tiny_encoder, tiny_tower, write_picture

ROOT = Path(__file__).resolve().parents[2]


def tiny_model(backend: str = "sdpa", dtype=torch.float32, vocab: int = 50, seed: int = 0,
               encoder: ImageEncoder | None = None, fusion: dict | None = None, **kw) -> MultiModalLLaMAAdapter:
    """Head dim 16 (the smallest the kernels take), GQA, two of three layers adapted, and
    gates and projection drawn at random so that the image path matters."""
    torch.manual_seed(seed)
    args = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=16, max_seq_len=64,
                adapter_len=3, adapter_layers=2, attention_backend=backend)
    args.update(kw)
    mm = MultiModalLLaMAAdapter(LLaMAAdapter(ModelArgs(**args)), encoder or tiny_encoder(), projection_hidden=24,
                                **(fusion or {}))
    with torch.no_grad():
        for attn in mm.llama.adapter_layers():
            attn.gate.uniform_(-1.5, 1.5)
        for name, p in mm.image_projection.named_parameters():
            p.normal_(0, 3.0 if name.endswith("weight") else 0.5)  # weights are scaled by 1/sqrt(fan_in)
    return mm.to(dtype)


def features(n: int = 2, width: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def tokens(B: int = 2, T: int = 9, vocab: int = 50, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def reference_logits(mm: MultiModalLLaMAAdapter, x: torch.Tensor, feats: torch.Tensor,
                     early_layers: int | None = None) -> torch.Tensor:
    """The paper's multi-modal equations, written out: I_p = Projection(Concat(I_m)); in each adapted
    layer (V2's early fusion: in the lowest `early_layers` adapted layers; P_l^v = P_l above)
    P_l^v = P_l + Repeat(I_p); prefix keys and values P_l^v W_k, P_l^v W_v (no
    rotary); every query attends to the words through a causal softmax and to the prefix
    through a softmax of its own scaled by tanh(gate). RMSNorm, rotary and the FFN are the
    model's (tested against transformers elsewhere); the attention is not."""
    llama, proj = mm.llama, mm.image_projection
    B, T = x.shape
    # I_p = Projection(Concat(I_m)), (B, dim): two layers, weights scaled by 1/sqrt(fan_in).
    hidden = F.gelu(feats @ proj.fc1.weight.T / math.sqrt(feats.shape[1]) + proj.fc1.bias)
    image = hidden @ proj.fc2.weight.T / math.sqrt(hidden.shape[1]) + proj.fc2.bias
    cos, sin = rope_cos_sin(torch.arange(T)[None], llama._inv_freq_for(x.device))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    h = llama.tok_embeddings(x)
    adapted = 0
    for layer in llama.layers:
        a = layer.attention
        H, G, D = a.n_heads, a.n_kv_heads, a.head_dim
        z = layer.attention_norm(h)
        q = apply_rotary(a.wq(z).view(B, T, H, D), cos, sin)
        k = apply_rotary(a.wk(z).view(B, T, G, D), cos, sin).repeat_interleave(H // G, dim=2)
        v = a.wv(z).view(B, T, G, D).repeat_interleave(H // G, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
        out = torch.einsum("bhts,bshd->bthd", scores.masked_fill(~causal, -math.inf).softmax(-1), v)
        if a.use_adapter:
            with_image = early_layers is None or adapted < early_layers
            adapted += 1
            prompt = a.adapter_prompt[None] + image[:, None, :] * with_image  # P_l^v = P_l + Repeat(I_p)
            P = prompt.shape[1]
            pk = a.wk(prompt).view(B, P, G, D).repeat_interleave(H // G, dim=2)
            pv = a.wv(prompt).view(B, P, G, D).repeat_interleave(H // G, dim=2)
            prefix = torch.einsum("bthd,bphd->bhtp", q, pk).div(math.sqrt(D)).softmax(-1)
            out = out + torch.tanh(a.gate)[None, None, :, None] * torch.einsum("bhtp,bphd->bthd", prefix, pv)
        h = h + a.wo(out.reshape(B, T, H * D))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return llama.output(llama.norm(h))


def trainable_grads(mm: MultiModalLLaMAAdapter) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in mm.named_parameters() if p.requires_grad}


def test_forward_and_gradients_equal_the_papers_equations():
    mm = tiny_model(dtype=torch.float64)
    x, f = tokens(), features().double()
    out = mm(x, image_features=f)
    out.logsumexp(-1).sum().backward()
    grads = trainable_grads(mm)
    mm.zero_grad(set_to_none=True)
    ref = reference_logits(mm, x, f)
    ref.logsumexp(-1).sum().backward()
    assert rel_error(out, ref) < 1e-12
    assert set(grads) == set(trainable_grads(mm))
    for name, g in trainable_grads(mm).items():
        assert g.abs().sum() > 0, name
        assert rel_error(grads[name], g) < 1e-10, name


def test_per_sample_prefix_reaches_the_triton_kernel(monkeypatch):
    """The fused kernels (Triton's interpreter on the CPU) receive a (B, Hkv, P, D) prefix
    once per adapted layer and give the reference's logits and gradients."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mm = tiny_model(backend="triton").to(device)
    prefixes = []
    op = model_module.gated_prefix_attention

    def spy(q, k, v, prefix_k, prefix_v, gate, **kw):
        prefixes.append((tuple(prefix_k.shape), kw["backend"]))
        return op(q, k, v, prefix_k, prefix_v, gate, **kw)

    monkeypatch.setattr(model_module, "gated_prefix_attention", spy)
    x, f = tokens(T=16).to(device), features().to(device)
    before = dict(LAUNCH_COUNTS)
    out = mm(x, image_features=f)
    out.float().logsumexp(-1).sum().backward()
    for name in ("forward", "backward_prefix", "backward"):
        assert LAUNCH_COUNTS[name] > before.get(name, 0), name
    assert prefixes == [((2, 2, 3, 16), "triton")] * 2
    grads = trainable_grads(mm)

    ref_model = tiny_model(dtype=torch.float64).to(device)
    ref_model.load_state_dict(mm.state_dict())
    mm.zero_grad(set_to_none=True)
    ref = reference_logits(ref_model, x, f.double())
    ref.logsumexp(-1).sum().backward()
    assert rel_error(out, ref) < 1e-5
    for name, g in trainable_grads(ref_model).items():
        assert rel_error(grads[name], g) < 1e-4, name


def test_early_fusion_equals_the_equations():
    """V2's early fusion: the image in the lowest adapted layer only (of two), against the
    equations; the same weights with the image in both layers give other logits."""
    mm = tiny_model(dtype=torch.float64, fusion={"image_fusion": "early"})
    assert mm.early_layers == 1 and [a.takes_prompt_offset for a in mm.llama.adapter_layers()] == [True, False]
    x, f = tokens(), features().double()
    out = mm(x, image_features=f)
    out.logsumexp(-1).sum().backward()
    grads = trainable_grads(mm)
    mm.zero_grad(set_to_none=True)
    ref = reference_logits(mm, x, f, early_layers=1)
    ref.logsumexp(-1).sum().backward()
    assert rel_error(out, ref) < 1e-12
    for name, g in trainable_grads(mm).items():
        assert rel_error(grads[name], g) < 1e-10, name
    assert rel_error(out, reference_logits(mm, x, f)) > 1e-3


def test_early_fusion_sends_per_sample_and_shared_prefixes_in_one_forward(monkeypatch):
    """The fused kernels receive the (B, Hkv, P, D) prefix in the early layer and the
    shared (Hkv, P, D) one above, in training and in cached generation, and cached
    generation equals recomputation."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mm = tiny_model(backend="triton", fusion={"image_fusion": "early", "early_layers": 1}).to(device)
    prefixes = []
    op = model_module.gated_prefix_attention

    def spy(q, k, v, prefix_k, prefix_v, gate, **kw):
        prefixes.append(tuple(prefix_k.shape))
        return op(q, k, v, prefix_k, prefix_v, gate, **kw)

    monkeypatch.setattr(model_module, "gated_prefix_attention", spy)
    x, f = tokens(T=16).to(device), features().to(device)
    before = dict(LAUNCH_COUNTS)
    mm(x, image_features=f).float().logsumexp(-1).sum().backward()
    assert LAUNCH_COUNTS["backward_prefix"] - before.get("backward_prefix", 0) == 2
    assert prefixes == [(2, 2, 3, 16), (2, 3, 16)]
    mm.eval()
    with torch.no_grad():
        offset = mm.prompt_offset(image_features=features(2).to(device))
        prompts = [[1, 5, 9, 13, 2, 7], [1, 3]]
        prefixes.clear()
        cached = generate(mm.llama, prompts, max_new_tokens=4, prompt_offset=offset)
        assert set(prefixes) == {(2, 2, 3, 16), (2, 3, 16)}
        assert cached == generate(mm.llama, prompts, max_new_tokens=4, prompt_offset=offset, use_cache=False)


def test_the_adapter_file_records_the_fusion(tmp_path):
    from llama_adapter_fast.models.multimodal import read_image_fusion

    mm = tiny_model(fusion={"image_fusion": "early"})
    path = tmp_path / "adapter.safetensors"
    mm.save_adapter(path)
    assert read_image_fusion(path) == {"image_fusion": "early", "early_layers": 1}
    again = tiny_model(seed=1, fusion=read_image_fusion(path))
    again.llama.load_state_dict(mm.llama.state_dict())
    again.load_adapter(path)
    x, f = tokens(), features()
    with torch.no_grad():
        assert torch.equal(again(x, image_features=f), mm(x, image_features=f))
    plain = tiny_model()
    plain.save_adapter(tmp_path / "all.safetensors")
    assert read_image_fusion(tmp_path / "all.safetensors") == {"image_fusion": "all", "early_layers": None}


@pytest.mark.parametrize(("fusion", "message"), [
    ({"image_fusion": "late"}, "image_fusion must be one of"),
    ({"image_fusion": "early", "early_layers": 2}, "early_layers must be an int in \\[1, 1\\]"),
    ({"image_fusion": "early", "early_layers": 0}, "early_layers must be an int"),
    ({"early_layers": 1}, "early_layers: only with image_fusion='early'"),
])
def test_bad_fusion_options_name_the_argument(fusion, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(fusion=fusion)


def test_zero_gates_give_the_base_models_logits():
    mm = tiny_model()
    with torch.no_grad():
        for attn in mm.llama.adapter_layers():
            attn.gate.zero_()
    base = LLaMAAdapter(ModelArgs(**{**vars(mm.args), "adapter_layers": 0}))
    base.load_state_dict(mm.llama.base_state_dict(), strict=False)
    x = tokens()
    with torch.no_grad():
        assert torch.allclose(mm(x, image_features=features()), base(x), atol=1e-6)
        # ... while open gates make the image matter.
        mm.llama.layers[2].attention.gate.fill_(0.8)
        a, b = mm(x, image_features=features(seed=1)), mm(x, image_features=features(seed=5))
    assert (a - b).abs().max() > 1e-3


def test_only_prompts_gates_and_projection_get_gradients():
    mm = tiny_model()
    mm(tokens(), images=torch.randn(2, 3, 16, 16)).logsumexp(-1).sum().backward()
    trainable = {n for n, p in mm.named_parameters() if p.requires_grad}
    expected = {f"llama.layers.{i}.attention.{k}" for i in (1, 2) for k in ("adapter_prompt", "gate")}
    expected |= {f"image_projection.fc{i}.{k}" for i in (1, 2) for k in ("weight", "bias")}
    assert trainable == expected
    for name, p in mm.named_parameters():
        if name in expected:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert mm.num_adapter_parameters() == sum(mm.adapter_state_dict()[n].numel() for n in mm.adapter_state_dict())


def test_text_only_samples_are_the_text_adapter():
    mm = tiny_model()
    x = tokens()
    with torch.no_grad():
        mixed = mm(x, image_features=features(), image_mask=torch.tensor([True, False]))
        text = mm.llama(x)
    assert torch.allclose(mixed[1], text[1], atol=1e-6)
    assert not torch.allclose(mixed[0], text[0], atol=1e-3)


def test_cached_generation_equals_recomputation_and_prefixes_are_computed_once(monkeypatch):
    mm = tiny_model(dtype=torch.float64).eval()  # float64: argmax ties cannot flip
    prompts = [[1, 5, 9, 13, 2, 7], [1, 3], [1, 8, 8, 4, 30, 11]]
    with torch.no_grad():
        offset = mm.prompt_offset(image_features=features(3).double())
    calls = []
    real = model_module.Attention.adapter_prefix

    def counted(self, prompt_offset=None):
        calls.append(None if prompt_offset is None else tuple(prompt_offset.shape))
        return real(self, prompt_offset)

    monkeypatch.setattr(model_module.Attention, "adapter_prefix", counted)
    cached = generate(mm.llama, prompts, max_new_tokens=6, prompt_offset=offset)
    assert calls == [(3, 64)] * 2  # once per adapted layer for the whole call
    full = generate(mm.llama, prompts, max_new_tokens=6, prompt_offset=offset, use_cache=False)
    assert cached == full
    alone = [generate(mm.llama, [p], max_new_tokens=6, prompt_offset=offset[i:i + 1])[0]
             for i, p in enumerate(prompts)]
    assert cached == alone
    assert cached != generate(mm.llama, prompts, max_new_tokens=6)  # the images change the answers


def test_swapping_two_images_in_a_batch_swaps_the_outputs():
    mm = tiny_model(dtype=torch.float64).eval()
    x = tokens(B=1).expand(2, -1)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        ab = mm(x, images=images)
        ba = mm(x, images=images.flip(0))
    assert not torch.allclose(ab[0], ab[1])
    # Equal up to float64 rounding (a row's place in the batch can change the summation order).
    assert torch.allclose(ab[0], ba[1], rtol=0, atol=1e-12) and torch.allclose(ab[1], ba[0], rtol=0, atol=1e-12)
    offsets = mm.prompt_offset(images=images).detach()
    prompts = [x[0].tolist()] * 2
    one = generate(mm.llama, prompts, max_new_tokens=6, prompt_offset=offsets)
    two = generate(mm.llama, prompts, max_new_tokens=6, prompt_offset=offsets.flip(0))
    assert one[0] != one[1] and one == two[::-1]


def test_bad_prompt_offsets_raise_clear_errors():
    mm = tiny_model()
    with pytest.raises(ValueError, match=r"prompt_offset must have shape \(2, 64\)"):
        mm.llama(tokens(), prompt_offset=torch.zeros(3, 64))
    with pytest.raises(ValueError, match="image_features must have shape"):
        mm(tokens(), image_features=torch.zeros(2, 31))
    with pytest.raises(ValueError, match=r"images must be pixel values of shape \(N, 3, 16, 16\)"):
        mm(tokens(), images=torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="KVCache"):
        from llama_adapter_fast.models.llama import KVCache

        mm.llama(tokens(), prompt_offset=torch.zeros(2, 64), cache=KVCache(mm.llama, 2, 16))


# -- the encoder ------------------------------------------------------------------------


def hf_clip(kind: str, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=24,
                  patch_size=8, projection_dim=12, hidden_act="quick_gelu")
    torch.manual_seed(seed)
    if kind == "clip":
        # A real CLIPModel's projection size is the top-level one; its vision_config keeps
        # transformers' default.
        vision = {k: v for k, v in vision.items() if k != "projection_dim"}
        config = transformers.CLIPConfig(vision_config=vision, text_config=dict(hidden_size=16, intermediate_size=24,
                                         num_hidden_layers=1, num_attention_heads=2, vocab_size=64),
                                         projection_dim=12)
        model = transformers.CLIPModel(config)
    else:
        cls = transformers.CLIPVisionModelWithProjection if kind == "projection" else transformers.CLIPVisionModel
        model = cls(transformers.CLIPVisionConfig(**vision))
    with torch.no_grad():  # weights far from their init, so that every part matters
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) * 0.3)
    return model.eval()


def clip_features(states, layers) -> torch.Tensor:
    """The encoder's feature, written out: each layer's [CLS] token standardized, concatenated."""
    return torch.cat([F.layer_norm(states[i][:, 0].float(), (states[i].shape[-1],)) for i in layers], dim=-1)


@pytest.mark.parametrize("kind", ["vision", "projection", "clip"])
def test_encoder_reads_every_clip_folder(tmp_path, kind):
    """A CLIPVisionModel, CLIPVisionModelWithProjection or whole CLIPModel folder gives the
    features of that model's own vision tower (transformers' forward), and saves and loads
    back to the same features."""
    from llama_adapter_fast.models.vision import image_processor

    hf = hf_clip(kind)
    hf.save_pretrained(tmp_path)
    image_processor(image_size=24).save_pretrained(tmp_path)
    encoder = ImageEncoder.from_pretrained(tmp_path, layers=[1, 3])
    pixels = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vision = hf.vision_model if kind == "clip" else hf
        ref = clip_features(vision(pixel_values=pixels, output_hidden_states=True).hidden_states, [1, 3])
    assert encoder.feature_dim == 64
    assert rel_error(encoder(pixels), ref) < 1e-6
    encoder.save_pretrained(tmp_path / "again")
    again = ImageEncoder.from_pretrained(tmp_path / "again", layers=[1, 3])
    assert torch.equal(again(pixels), encoder(pixels))
    assert again.weights_sha256() == encoder.weights_sha256()


def test_encoder_refuses_a_folder_whose_weights_do_not_fill_the_tower(tmp_path):
    from safetensors.torch import load_file, save_file

    from llama_adapter_fast.models.vision import image_processor

    hf_clip("vision").save_pretrained(tmp_path)
    image_processor(image_size=24).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state[next(k for k in state if "layers.1.mlp.fc1.weight" in k)]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="the weights do not match its config.json: missing"):
        ImageEncoder.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="is not a CLIP folder .model_type 'llama'"):
        ImageEncoder.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "hidden_size": 8}))
    with pytest.raises(ValueError, match="cannot be read as a CLIP vision tower"):
        ImageEncoder.from_pretrained(tmp_path)


def test_encoder_preprocesses_with_the_folders_processor(tmp_path):
    """The folder's preprocessor_config.json (sizes, crop, mean, std) is what encode applies:
    its features equal the tower's on transformers' own preprocessing of the pictures."""
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    from llama_adapter_fast.models.vision import image_processor

    hf_clip("vision").save_pretrained(tmp_path)
    config = {"size": {"shortest_edge": 30}, "crop_size": {"height": 24, "width": 24}, "resample": 3,
              "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.25]}
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    processor_cls(**config).save_pretrained(tmp_path)
    encoder = ImageEncoder.from_pretrained(tmp_path, layers=[2])
    assert encoder.processor.crop_size == image_processor(tmp_path).crop_size == {"height": 24, "width": 24}
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
              for w, h in ((45, 31), (17, 29), (30, 30))]
    pixels = torch.as_tensor(processor_cls(**config)(images, return_tensors="np")["pixel_values"])
    assert torch.equal(encoder.encode(images), encoder(pixels))
    assert encoder.record()["preprocessor"]["image_mean"] == [0.4, 0.5, 0.6]


def test_default_feature_layers():
    assert default_feature_layers(12) == [3, 6, 9, 12]
    assert default_feature_layers(24) == [6, 12, 18, 24]
    assert default_feature_layers(2) == [1, 2]
    with pytest.raises(ValueError, match="image layers"):
        ImageEncoder(tiny_tower(), layers=[0, 4])


# -- files: pictures, feature cache, errors, adapter files ---------------------------------


def test_feature_cache_is_keyed_by_content(tmp_path, encoder_dir, monkeypatch):
    encoder = ImageEncoder.from_pretrained(encoder_dir, layers=[1, 3])
    a = write_picture(tmp_path / "pics" / "a.png", 0)
    write_picture(tmp_path / "pics" / "b.png", 1)
    shutil.copy(a, tmp_path / "pics" / "a_copy.png")
    data = tmp_path / "data.jsonl"
    rows = [{"instruction": "What colour?", "output": "red", "image": "pics/a.png"},
            {"instruction": "What colour?", "output": "blue", "image": "pics/b.png"},
            {"instruction": "Say hi.", "output": "hi"},
            {"instruction": "What colour?", "output": "red", "image": "pics/a_copy.png"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = Tokenizer()
    calls = []
    real = ImageEncoder.forward
    monkeypatch.setattr(ImageEncoder, "forward", lambda self, px: calls.append(len(px)) or real(self, px))
    cache = FeatureCache(tmp_path / "cache", encoder)
    first = ImageInstructionDataset(data, tok, encoder, cache=cache, progress=False)
    assert calls == [2]  # a and its copy share one encoding
    assert first.image_mask.tolist() == [True, True, False, True]
    assert torch.equal(first.image_features[0], first.image_features[3])
    assert torch.count_nonzero(first.image_features[2]) == 0
    assert torch.allclose(first.image_features[0], encoder.encode([load_image(a)])[0])
    second = ImageInstructionDataset(data, tok, encoder, cache=cache, progress=False)
    assert calls == [2, 1]  # the check above; the data set itself read everything from the cache
    assert torch.equal(first.image_features, second.image_features)
    item = second[1]
    assert item["image_features"].shape == (encoder.feature_dim,) and bool(item["image_mask"])


def test_the_encoders_fingerprint_follows_its_weights(encoder_dir, monkeypatch):
    """Weights written in place or replaced (another dtype) change the key of the feature
    cache and the encoder's record; untouched weights keep it. The record names the folder
    absolute, whatever the working directory was."""
    monkeypatch.chdir(encoder_dir.parent)
    encoder = ImageEncoder.from_pretrained(encoder_dir.name)
    assert encoder.record()["source"] == str(encoder_dir.resolve())
    first = encoder.fingerprint()
    assert encoder.fingerprint() == first
    with torch.no_grad():
        next(encoder.tower.parameters()).mul_(2)
    second = encoder.fingerprint()
    assert second != first
    encoder.tower.double()
    assert encoder.fingerprint() not in (first, second)


@pytest.mark.parametrize("problem", ["missing", "not_an_image", "truncated"])
def test_bad_images_name_the_data_file_record_and_image(tmp_path, encoder_dir, problem):
    encoder = ImageEncoder.from_pretrained(encoder_dir)
    good = write_picture(tmp_path / "good.png", 0)
    bad = tmp_path / "bad.png"
    if problem == "not_an_image":
        bad.write_bytes(b"this is not a picture")
    elif problem == "truncated":
        bad.write_bytes(good.read_bytes()[:80])
    data = tmp_path / "data.jsonl"
    rows = [{"instruction": "q", "output": "a", "image": "good.png"}, {"instruction": "q", "output": "a"},
            {"instruction": "q", "output": "a", "image": "bad.png"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ImageError) as info:
        ImageInstructionDataset(data, Tokenizer(), encoder, progress=False)
    message = str(info.value)
    assert f"{data}: record 2" in message and str(bad) in message, message


def test_bundled_pictures_are_regenerated_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_shape_images.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    bundled = sorted(p.relative_to(SHAPES_DIR) for p in SHAPES_DIR.rglob("*") if p.is_file())
    assert made == bundled and len(made) == 243
    for rel in made:
        assert (tmp_path / rel).read_bytes() == (SHAPES_DIR / rel).read_bytes(), rel
    # Pillow reads the hand-written PNG files, and no held-out picture is a training picture.
    image = load_image(SHAPES_DIR / "images" / "train_000.png")
    assert image.size == (32, 32) and image.mode == "RGB"
    train = {(SHAPES_DIR / "images" / f"train_{i:03d}.png").read_bytes() for i in range(180)}
    held = {(SHAPES_DIR / "images" / f"heldout_{i:03d}.png").read_bytes() for i in range(60)}
    assert len(train) == 180 and len(held) == 60 and not train & held
