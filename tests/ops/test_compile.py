"""torch.library and torch.compile: opcheck of the custom ops, and torch.compile with
fullgraph=True (no graph break) of the op and of models that use it, forward and backward,
against eager execution."""

import copy

import pytest
import torch

from llama_adapter_fast import gated_prefix_attention
from llama_adapter_fast.ops import custom_ops
from llama_adapter_fast.ops.testing import DEVICE, expect_launches, rel_error

OPS = torch.ops.llama_adapter_fast


def op_inputs(transposed: bool, shared_prefix: bool, padding: bool, seed: int = 0) -> list:
    """Tiny random inputs of the fused op (B=2, Hq=4, Hkv=2, T=9, D=16, P=3)."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, T, D, P = 2, 4, 2, 9, 16, 3

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    if transposed:
        q, k, v = (rand(B, T, h, D).transpose(1, 2) for h in (Hq, Hkv, Hkv))
    else:
        q, k, v = rand(B, Hq, T, D), rand(B, Hkv, T, D), rand(B, Hkv, T, D)
    prefix_shape = (Hkv, P, D) if shared_prefix else (B, Hkv, P, D)
    pk, pv = rand(*prefix_shape), rand(*prefix_shape)
    gate = torch.tensor([0.7, -0.4, 1.1, 0.3])
    mask = None
    if padding:
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[0, :4] = False
    # CUDA where there is a GPU, else the CPU (the kernels under Triton's interpreter)
    return [None if t is None else t.to(DEVICE) for t in (q, k, v, pk, pv, gate, mask)]


@pytest.mark.parametrize("variant", [
    dict(transposed=False, shared_prefix=True, padding=True, causal=True, deterministic=False),
    dict(transposed=True, shared_prefix=False, padding=False, causal=False, deterministic=True),
])
def test_opcheck(variant):
    variant = dict(variant)
    causal, deterministic = variant.pop("causal"), variant.pop("deterministic")
    q, k, v, pk, pv, gate, mask = op_inputs(**variant)
    gate_act = gate.repeat(q.shape[0])  # the custom ops take one per sequence and head
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pv, gate_act)]
    args = (*leaves, mask, causal, 0.25, deterministic)
    torch.library.opcheck(OPS.gpa_forward.default, args)
    out, lse1, lse2 = custom_ops.gpa_forward(*args)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    detached = [t.detach() for t in leaves]
    torch.library.opcheck(OPS.gpa_backward.default,
                          (grad_out, *detached, mask, out.detach(), lse1, lse2, causal, 0.25, deterministic))


def forward_backward(fn, inputs: list) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:6]]
    out = fn(*leaves, inputs[6])
    grads = torch.autograd.grad(out.square().sum(), leaves)
    return out, list(grads)


@pytest.mark.parametrize("op_backend, compiler", [
    ("sdpa", "aot_eager"),
    ("sdpa", "inductor"),
    ("triton", "aot_eager"),  # the custom ops, opaque to the compiler
    ("triton", "inductor"),
])
def test_op_compiles_with_fullgraph(op_backend, compiler):
    torch._dynamo.reset()

    def fn(q, k, v, pk, pv, gate, mask):
        return gated_prefix_attention(q, k, v, pk, pv, gate, key_padding_mask=mask, backend=op_backend)

    inputs = op_inputs(transposed=False, shared_prefix=True, padding=True)
    ref, ref_grads = forward_backward(fn, inputs)
    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    kernels = ("forward", "backward_prefix") if op_backend == "triton" else ()
    with expect_launches(*kernels):
        out, grads = forward_backward(compiled, inputs)
    assert rel_error(out, ref) < 1e-5
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_error(g, r) < 1e-5


# ------------------------------------------------------------------------------------------
# Models that use the op


def tiny_llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def set_gates(model, value: float = 0.5) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("adaption_gate"):
                param.fill_(value)


def model_inputs() -> list[dict]:
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    return [{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids}]


def check_compiled_model(model, compiler: str, backward: bool = True) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    params = [p for p in model.parameters() if p.requires_grad]
    for inputs in model_inputs():
        valid = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
        results = []
        for fn in (model, compiled):
            with torch.set_grad_enabled(backward):
                logits = fn(**inputs, use_cache=False).logits[valid]
            grads = torch.autograd.grad(logits.square().sum(), params) if backward else ()
            results.append((logits.detach(), grads))
        (ref, ref_grads), (out, grads) = results
        assert rel_error(out, ref) < 1e-5
        for g, r in zip(grads, ref_grads, strict=True):
            assert rel_error(g, r) < 1e-5


@pytest.mark.parametrize("compiler, backward", [("aot_eager", True), ("inductor", False)])
def test_transformers_adapter_compiles_with_fullgraph(compiler, backward):
    pytest.importorskip("transformers")
    from llama_adapter_fast.integrations.transformers import add_llama_adapter

    model = add_llama_adapter(tiny_llama(layers=1), adapter_len=3, adapter_layers=1, backend="sdpa")
    set_gates(model)
    check_compiled_model(model, compiler, backward)


def test_transformers_adapter_compiles_packed_batches_on_the_cpu_backends():
    """A Llama given the flash-attention kwargs of a packed batch (cu_seq_lens_q and
    friends) compiles with fullgraph where "auto" picks sdpa, to the eager results."""
    pytest.importorskip("transformers")
    from llama_adapter_fast.integrations.transformers import add_llama_adapter

    model = add_llama_adapter(tiny_llama(layers=2), adapter_len=3, adapter_layers=1, backend="auto")
    set_gates(model)
    cu = torch.tensor([0, 5, 6, 15, 19], dtype=torch.int32)
    ids = torch.randint(0, 61, (1, 19), generator=torch.Generator().manual_seed(1))
    inputs = dict(input_ids=ids, position_ids=(torch.arange(19) - torch.repeat_interleave(cu[:-1], cu.diff()))[None],
                  cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9, use_cache=False)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    torch._dynamo.reset()
    for fn in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        logits = fn(**inputs).logits
        results.append((logits.detach(), torch.autograd.grad(logits.square().sum(), params)))
    (ref, ref_grads), (out, grads) = results
    assert rel_error(out, ref) < 1e-5
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_error(g, r) < 1e-5


def tiny_gpt2(layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=61, n_embd=32, n_layer=layers, n_head=4, n_positions=64, attn_pdrop=0.0,
                        resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fused_peft_compiles_with_fullgraph(arch):
    pytest.importorskip("peft")
    from peft import AdaptionPromptConfig, get_peft_model

    from llama_adapter_fast.integrations.peft import enable_fused_adaption_prompt

    base = tiny_llama() if arch == "llama" else tiny_gpt2()
    model = get_peft_model(base, AdaptionPromptConfig(adapter_len=3, adapter_layers=1, task_type="CAUSAL_LM"))
    enable_fused_adaption_prompt(model, backend="sdpa")
    set_gates(model)
    check_compiled_model(model.base_model.model, "aot_eager")


def test_triton_model_compiles_with_fullgraph():
    """A model over the fused kernels (on the CPU, under Triton's interpreter)."""
    pytest.importorskip("transformers")
    from llama_adapter_fast.integrations.transformers import add_llama_adapter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = add_llama_adapter(tiny_llama().to(device), adapter_len=3, adapter_layers=2, backend="triton")
    set_gates(model)
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if hasattr(module, "adaption_backend"):
            module.adaption_backend = "sdpa"
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    inputs = {k: v.to(device) for k, v in model_inputs()[0].items()}
    valid = inputs["attention_mask"].bool()
    with expect_launches("forward", "backward_prefix"):
        out = compiled(**inputs, use_cache=False).logits[valid]
        out.square().sum().backward()
    ref = reference(**inputs, use_cache=False).logits[valid]
    ref.square().sum().backward()
    assert rel_error(out, ref) < 1e-4
    for p, r in zip(model.parameters(), reference.parameters(), strict=True):
        if p.requires_grad:
            assert rel_error(p.grad, r.grad) < 1e-4
