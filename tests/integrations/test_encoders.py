"""add_llama_adapter on tiny random encoders: ViT, RoBERTa, BERT and CLIP (causal text
tower, bidirectional vision tower). The fused model is checked against a reference adapter
written here from the paper's equations (materialized softmaxes), registered with
transformers as an attention implementation of its own, on the same weights."""

import copy
import math

import pytest
import torch

pytest.importorskip("transformers")

from transformers import (
    AttentionInterface,
    BertConfig,
    BertForSequenceClassification,
    CLIPConfig,
    CLIPModel,
    RobertaConfig,
    RobertaForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from llama_adapter_fast.integrations.transformers import (
    ATTENTION_NAME,
    add_llama_adapter,
    llama_adapter_state_dict,
    load_llama_adapter,
    remove_llama_adapter,
    save_llama_adapter,
)
from llama_adapter_fast.ops.testing import DEVICE, expect_launches, rel_error

VOCAB, PAD, EOS = 40, 1, 39
B, T, IMAGE = 3, 9, 16
LONG_T = 37  # three of the interpreter's 16-row blocks (ViT: 17 tokens, two)
FAMILIES = ("vit", "roberta", "bert", "clip")


def base_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, attn_implementation="sdpa")
    if family == "vit":  # 16 patches and the class token
        config = ViTConfig(**common, num_hidden_layers=3, image_size=IMAGE, patch_size=4, num_labels=3, **overrides)
        return ViTForImageClassification(config).eval()
    if family in ("roberta", "bert"):
        text = {**dict(common, vocab_size=VOCAB, num_hidden_layers=3, max_position_embeddings=LONG_T + 4, num_labels=3,
                       pad_token_id=PAD), **overrides}
        if family == "roberta":
            return RobertaForSequenceClassification(RobertaConfig(**text)).eval()
        return BertForSequenceClassification(BertConfig(**text)).eval()
    tower = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=VOCAB, max_position_embeddings=LONG_T, bos_token_id=0, eos_token_id=EOS,
                         pad_token_id=PAD),
        vision_config=dict(tower, num_hidden_layers=3, image_size=IMAGE, patch_size=4),
        projection_dim=16, attn_implementation="sdpa", **overrides,
    )
    return CLIPModel(config).eval()


def batch(family: str, padding: bool = True, T: int = T) -> dict:
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(B, 3, IMAGE, IMAGE, generator=g)
    if family == "vit":
        return {"pixel_values": pixels}
    ids = torch.randint(2, EOS, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if padding:  # right padding, as tokenizers of encoders give
        mask[0, 5:] = 0
        mask[2, 8:] = 0
    ids[torch.arange(B), mask.sum(1) - 1] = EOS
    ids[mask == 0] = PAD
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family == "clip":
        inputs["pixel_values"] = pixels
    return inputs


def outputs(family: str, model, inputs: dict) -> torch.Tensor:
    """Everything the model computes that a user reads, at the real tokens, in one vector."""
    out = model(**inputs, output_hidden_states=family != "clip")
    if family == "clip":
        valid = inputs["attention_mask"].bool()
        parts = [out.logits_per_image, out.text_model_output.last_hidden_state[valid],
                 out.vision_model_output.last_hidden_state]
    else:
        hidden = out.hidden_states[-1]
        parts = [out.logits, hidden if family == "vit" else hidden[inputs["attention_mask"].bool()]]
    return torch.cat([p.flatten() for p in parts])


def adapted(family: str, gates: bool = True, **kwargs) -> torch.nn.Module:
    kwargs = {"adapter_len": 4, "adapter_layers": 2, "backend": "sdpa", "train_head": family != "clip", **kwargs}
    model = add_llama_adapter(base_model(family), **kwargs)
    if gates:
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("adaption_gate"):
                    param.copy_(torch.rand(param.shape, generator=g) * 2 - 1)
    return model


# ------------------------------------------------------------------------------------------
# The reference: zero-initialized attention as the paper writes it


REFERENCE = "reference_adapter"


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """out = softmax(s q K^T + mask) V + tanh(g) softmax(s q Kp^T) Vp, with Kp and Vp the
    layer's key and value projections of its prompt, every softmax materialized."""
    _, H, T_, D = query.shape
    S = key.shape[2]
    scaling = D**-0.5 if scaling is None else scaling
    causal = kwargs.get("is_causal")
    causal = module.is_causal if causal is None else causal
    allowed = torch.ones(T_, S, dtype=torch.bool).tril(S - T_) if causal else torch.ones(T_, S, dtype=torch.bool)
    if attention_mask is not None:  # sdpa_mask's boolean 4-d mask
        allowed = allowed & attention_mask
    scores = (query @ key.transpose(-1, -2) * scaling).masked_fill(~allowed, -math.inf)
    out = torch.softmax(scores, dim=-1) @ value
    prompt = getattr(module, "adaption_prompt", None)
    if prompt is not None:
        key_proj, value_proj = (module.k_proj, module.v_proj) if hasattr(module, "k_proj") else (module.key,
                                                                                                 module.value)
        P = prompt.shape[0]
        prompt = prompt.to(query.dtype)
        prefix_k = key_proj(prompt).view(P, H, D).transpose(0, 1)  # (H, P, D), no position information
        prefix_v = value_proj(prompt).view(P, H, D).transpose(0, 1)
        prefix_probs = torch.softmax(query @ prefix_k.transpose(-1, -2) * scaling, dim=-1)  # never masked
        gate = torch.tanh(module.adaption_gate).view(-1, 1, 1)
        out = (out + gate * (prefix_probs @ prefix_v)).to(query.dtype)
    return out.transpose(1, 2), None


AttentionInterface.register(REFERENCE, reference_attention)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


def as_reference(model: torch.nn.Module) -> torch.nn.Module:
    reference = copy.deepcopy(model)
    reference.set_attn_implementation(REFERENCE)
    return reference


def outputs_and_grads(family: str, model, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = outputs(family, model, inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(11)).to(out.device)
    params = {n.removeprefix("_orig_mod."): p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad((out * weights).sum(), list(params.values()))
    return out.detach(), dict(zip(params, grads, strict=True))


def assert_matches_reference(family: str, model, inputs: dict, tol: float) -> None:
    """Outputs and gradients, relative to the reference attention's, within `tol`."""
    ref_out, ref_grads = outputs_and_grads(family, as_reference(model), inputs)
    out, grads = outputs_and_grads(family, model, inputs)
    assert rel_error(out, ref_out) < tol
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].abs().sum() > 0, f"{name} got no gradient"
        assert rel_error(grads[name], ref_grads[name]) < tol, name


# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_the_reference_adapter(family, op_calls):
    """Outputs and the gradients of every prompt, gate and head parameter equal the paper's
    equations, and each adapted layer ran the fused op in its model's attention mode."""
    model = adapted(family)
    assert model.config._attn_implementation == ATTENTION_NAME
    inputs = batch(family)
    assert_matches_reference(family, model, inputs, 1e-5)
    modes = [(kw["causal"], kw.get("key_padding_mask") is not None) for kw in op_calls.kwargs]
    assert set(op_calls) == {"sdpa"}
    if family == "vit":  # bidirectional, nothing padded
        assert modes == [(False, False)] * 2
    elif family in ("roberta", "bert"):  # bidirectional, padding as key padding
        assert modes == [(False, True)] * 2
    else:  # CLIP runs its vision tower (bidirectional), then its text tower (causal, padded)
        assert modes == [(False, False)] * 2 + [(True, True)] * 2


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_backend_runs_the_kernels(family):
    # CUDA where there is a GPU, else the CPU under Triton's interpreter (see conftest.py)
    # Two adapted layers, each launching each kernel once (CLIP: two in each tower).
    model = adapted(family, backend="triton").to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in batch(family, T=LONG_T).items()}
    with expect_launches("forward", "backward_prefix", "backward", times=4 if family == "clip" else 2):
        assert_matches_reference(family, model, inputs, 2e-5)


@pytest.mark.parametrize("family", ["roberta", "clip"])
@pytest.mark.parametrize("dtype, floor", [(torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
def test_low_precision(family, dtype, floor):
    """On a float16 or bfloat16 model (prompts and gates kept in float32) the fused path is
    no further from the float32 reference than twice the reference run in that precision."""
    model32 = adapted(family)
    inputs = batch(family)
    ref, ref_grads = outputs_and_grads(family, as_reference(model32), inputs)
    model = copy.deepcopy(model32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaption_" not in name:
                param.data = param.data.to(dtype)
    results = [outputs_and_grads(family, m, inputs) for m in (model, as_reference(model))]
    (out, grads), (low_ref, low_ref_grads) = results
    assert rel_error(out, ref) <= max(2 * rel_error(low_ref, ref), floor)
    for name in ref_grads:
        err, ref_err = rel_error(grads[name], ref_grads[name]), rel_error(low_ref_grads[name], ref_grads[name])
        assert err <= max(2 * ref_err, floor), f"{name}: {err:.3g} vs the reference's {ref_err:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_gates_give_the_base_model(family, op_calls):
    base = base_model(family)
    model = adapted(family, gates=False)
    for inputs in (batch(family), batch(family, padding=False)):
        torch.testing.assert_close(outputs(family, model, inputs), outputs(family, base, inputs),
                                   rtol=1e-5, atol=1e-5)
    assert len(op_calls) == (8 if family == "clip" else 4)  # two adapted layers per tower, both inputs


@pytest.mark.parametrize("family", ["roberta", "clip"])
def test_padding_is_honoured(family):
    """What the padded positions hold changes nothing at the real ones (non-zero gates)."""
    model = adapted(family)
    inputs = batch(family)
    other = dict(inputs, input_ids=inputs["input_ids"].where(inputs["attention_mask"].bool(), 7))
    torch.testing.assert_close(outputs(family, model, other), outputs(family, model, inputs))


@pytest.mark.parametrize("family, trained", [
    ("vit", ["classifier.weight", "classifier.bias"]),
    ("roberta", ["classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
                 "classifier.out_proj.bias"]),
])
def test_only_the_adapter_and_the_head_train(family, trained):
    model = adapted(family)
    layers = "vit.layers.{}.attention" if family == "vit" else "roberta.encoder.layer.{}.attention.self"
    prompts = [f"{layers.format(i)}.{n}" for i in (1, 2) for n in ("adaption_prompt", "adaption_gate")]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == prompts + trained
    frozen = adapted(family, train_head=False)
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == prompts
    assert frozen.config.num_attention_heads == 4 and model.get_parameter(prompts[1]).shape == (4,)


def test_clip_adapts_both_towers_and_has_no_head():
    model = adapted("clip", adapter_layers=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{tower}.encoder.layers.{i}.self_attn.{n}"
                         for tower, layers in (("text_model", (0, 1)), ("vision_model", (1, 2)))
                         for i in layers for n in ("adaption_prompt", "adaption_gate")]
    with pytest.raises(ValueError, match="train_head"):
        add_llama_adapter(base_model("clip"), adapter_layers=1, train_head=True)
    with pytest.raises(ValueError, match="text_model.encoder.layers"):
        add_llama_adapter(base_model("clip"), adapter_layers=3)  # the text tower has 2 layers


@pytest.mark.parametrize("family, train_head", [("roberta", True), ("vit", False), ("clip", False)])
def test_save_and_load(family, train_head, tmp_path):
    model = adapted(family, train_head=train_head)
    if train_head:  # a trained head differs from a fresh model's
        with torch.no_grad():
            model.classifier.out_proj.bias.add_(1.0)
    inputs = batch(family)
    expected = outputs(family, model, inputs)
    path = tmp_path / "adapter.safetensors"
    save_llama_adapter(model, path)
    from safetensors.torch import load_file

    saved = load_file(path)
    assert saved.keys() == llama_adapter_state_dict(model).keys()
    heads = [n for n in saved if n.startswith("classifier.")]
    assert len(heads) == (4 if train_head else 0)
    fresh = load_llama_adapter(base_model(family), path, backend="sdpa")
    assert fresh.llama_adapter_config["train_head"] is train_head
    torch.testing.assert_close(outputs(family, fresh, inputs), expected)


def test_remove_restores_the_base_model():
    base = base_model("bert")
    model = remove_llama_adapter(adapted("bert"))
    assert model.config._attn_implementation == "sdpa"
    assert not any(p.requires_grad for p in model.parameters())
    inputs = batch("bert")
    torch.testing.assert_close(outputs("bert", model, inputs), outputs("bert", base, inputs))


def test_compiles_with_fullgraph():
    """torch.compile(fullgraph=True) traces a padded RoBERTa with its adapter and head,
    forward and backward, to the eager results."""
    model = adapted("roberta")
    inputs = batch("roberta")
    ref, ref_grads = outputs_and_grads("roberta", model, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out, grads = outputs_and_grads("roberta", compiled, inputs)
    assert rel_error(out, ref) < 1e-5
    for name in grads:
        assert rel_error(grads[name], ref_grads[name]) < 1e-5, name


def test_bad_input():
    with pytest.raises(TypeError, match="train_head"):
        add_llama_adapter(base_model("vit"), adapter_layers=1, train_head=1)
    with pytest.raises(ValueError, match="adapter_layers"):
        add_llama_adapter(base_model("vit"), adapter_layers=4)
    with pytest.raises(ValueError, match="no self-attention"):
        add_llama_adapter(_no_attention_model())
    model = add_llama_adapter(base_model("bert", attention_probs_dropout_prob=0.1), adapter_layers=1).train()
    with pytest.raises(ValueError, match="attention_probs_dropout_prob"):
        model(**batch("bert"))


def _no_attention_model() -> torch.nn.Module:
    model = torch.nn.Linear(2, 2)
    model.config = BertConfig()
    return model


def test_restarting_position_ids_are_no_packing_in_an_encoder(op_calls):
    """An encoder's position_ids are not read as packing by the integration: whatever mask
    transformers builds for them, at zero gates the adapted model is the base model. Up to
    transformers 5.24 BERT attends across the whole row (its mask ignores position_ids) and
    the adapted attention runs the op unpacked; from 5.25 transformers packs the row by them,
    and its block mask is computed exactly by two masked SDPA calls."""
    import transformers
    from packaging.version import Version

    base = base_model("bert")
    model = adapted("bert", gates=False)
    ids = torch.randint(2, EOS, (1, 12), generator=torch.Generator().manual_seed(4))
    inputs = {"input_ids": ids, "position_ids": torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base(**inputs).logits, rtol=1e-5, atol=1e-5)
    assert not any(kw["packed"] for kw in op_calls.kwargs)
    if Version(transformers.__version__) < Version("5.25"):
        assert op_calls


def test_shared_layer_models_are_refused():
    """ALBERT runs one layer at every depth: an adapter on it would adapt all of them."""
    from transformers import AlbertConfig, AlbertForSequenceClassification

    model = AlbertForSequenceClassification(AlbertConfig(
        vocab_size=VOCAB, embedding_size=16, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=4, attn_implementation="sdpa"))
    for layers in (1, 2):
        with pytest.raises(ValueError, match="shares one layer"):
            add_llama_adapter(model, adapter_layers=layers)
    assert model.config._attn_implementation == "sdpa"
    assert not any(n.endswith("adaption_prompt") for n, _ in model.named_parameters())


def test_a_failed_load_leaves_the_model_as_it_was(tmp_path):
    """A RoBERTa with another num_labels: the head does not fit the file. The error names the
    tensor, and the model is unchanged: no adapter, its attention and its frozen set kept."""
    model = adapted("roberta", train_head=True)
    path = tmp_path / "adapter.safetensors"
    save_llama_adapter(model, path)
    other = base_model("roberta", num_labels=5)
    before = {n: p.requires_grad for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="classifier.out_proj.weight"):
        load_llama_adapter(other, path, backend="sdpa")
    assert not hasattr(other, "llama_adapter_config")
    assert other.config._attn_implementation == "sdpa"
    assert {n: p.requires_grad for n, p in other.named_parameters()} == before
    with pytest.raises(ValueError, match="cannot be read"):
        load_llama_adapter(other, tmp_path / "missing.safetensors")
    assert not hasattr(other, "llama_adapter_config")
