"""Text generation with a KV cache: greedy, temperature and top-p sampling, stop at EOS,
batched prompts of different lengths.

Prompts are padded on the left so that every sequence ends at the same cache slot; the
padded keys are masked out and each sequence's rotary positions count its own tokens
only, so a prompt gives the same answer alone or in a batch. The adapter's prefix keys
and values are computed once per call (when the cache is made), not at every step.

A batch may mix adapters over one base: `adapters` (an AdapterBank) and `adapter_names`,
one name (or None, the base alone) per prompt; each answer is the one its adapter gives
alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from llama_adapter_fast.models.adapter_bank import AdapterBank
from llama_adapter_fast.models.llama import KVCache, LLaMAAdapter
from llama_adapter_fast.models.multimodal import MultiModalLLaMAAdapter
from llama_adapter_fast.training.templates import prompt_ids


class ContextLimitWarning(UserWarning):
    """An answer stopped at the end of the model's context, not at an end of turn."""


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, vocab): argmax when temperature is
    0, else a draw from softmax(logits / temperature) restricted to the smallest set of
    tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token if the mass before it is below top_p (so the most likely one always stays).
        keep = sorted_probs.cumsum(dim=-1) - sorted_probs < top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_args(prompts, max_new_tokens, temperature, top_p) -> list[int]:
    """Validate; returns the cap on new tokens of each prompt."""
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of token id lists")
    for i, p in enumerate(prompts):
        if not isinstance(p, Sequence) or len(p) == 0:
            raise ValueError(f"prompts[{i}] must be a non-empty list of token ids")
    caps = max_new_tokens if isinstance(max_new_tokens, Sequence) else [max_new_tokens] * len(prompts)
    if len(caps) != len(prompts):
        raise ValueError(f"max_new_tokens must be an int or one int per prompt ({len(prompts)}), got {len(caps)}")
    for cap in caps:
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0 (or one per prompt), got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return list(caps)


def _stop_ids(eos_id: object) -> tuple[int, ...]:
    if eos_id is None:
        return ()
    ids = [eos_id] if isinstance(eos_id, int) and not isinstance(eos_id, bool) else eos_id
    try:
        ids = tuple(ids)
    except TypeError:
        ids = None
    if ids is None or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"eos_id must be an int, a sequence of ints or None, got {eos_id!r}")
    return ids


def _mixed_prefixes(model: LLaMAAdapter, batch_size: int, adapters: AdapterBank | None,
                    adapter_names: Sequence[str | None] | None, prompt_offset: torch.Tensor | None,
                    use_cache: bool) -> list | None:
    """The cache's per-sample prefixes and gates of a batch that mixes adapters, or None."""
    if adapter_names is None:
        if adapters is not None:
            raise ValueError("adapters: give adapter_names too, one adapter name (or None) per prompt")
        return None
    if not isinstance(adapters, AdapterBank) or adapters.model is not model:
        raise ValueError("adapter_names needs adapters, an AdapterBank of this model")
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or len(adapter_names) != batch_size:
        raise ValueError(f"adapter_names must hold one adapter name (or None) per prompt ({batch_size}), got "
                         f"{adapter_names!r}")
    if prompt_offset is not None:
        raise ValueError("prompt_offset: a multi-modal prompt offset cannot be combined with adapter_names")
    if not use_cache:
        raise ValueError("adapter_names: a batch that mixes adapters runs with the KV cache (use_cache=True)")
    return adapters.prefixes(adapter_names)


@torch.no_grad()
def generate(
    model: LLaMAAdapter,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int] = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | Sequence[int] | None = None,
    pad_id: int = 0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    prompt_offset: torch.Tensor | None = None,
    adapters: AdapterBank | None = None,
    adapter_names: Sequence[str | None] | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) and return the new tokens of each, cut
    before the first stop id: `eos_id`, one id or several (Llama 3 Instruct ends a turn with
    either of two; a tokenizer's `stop_ids`). `max_new_tokens` caps every prompt alike, or each prompt with one
    int per prompt; a prompt and its new tokens must fit the model's max_seq_len.

    With use_cache=False every step runs the whole sequence again (slow; the reference the
    cached path is tested against). Sampling draws from `generator` when given.
    `prompt_offset` (B, dim) conditions each sequence's adaption prompts (the multi-modal
    adapter's projected image features); its prefixes are computed once per call.
    `adapters` and `adapter_names` (one per prompt, None for the base alone): each prompt
    answered by its own adapter of the bank, in one batch over the shared base.
    """
    caps = _check_args(prompts, max_new_tokens, temperature, top_p)
    prefixes = _mixed_prefixes(model, len(prompts), adapters, adapter_names, prompt_offset, use_cache)
    stops = _stop_ids(eos_id)
    device = model.tok_embeddings.weight.device
    stop_tensor = torch.tensor(stops, dtype=torch.long, device=device)
    B = len(prompts)
    for i, (p, cap) in enumerate(zip(prompts, caps, strict=True)):
        if len(p) + cap > model.args.max_seq_len:
            raise ValueError(f"prompts[{i}] ({len(p)} tokens) plus its max_new_tokens ({cap}) exceeds the model's "
                             f"max_seq_len ({model.args.max_seq_len})")
    prompt_len = max(len(p) for p in prompts)
    # Rotary positions count each sequence's own tokens, so the batch's slots may exceed
    # max_seq_len while no sequence's positions do.
    total = prompt_len + max(caps)
    cap_of = torch.tensor(caps, device=device)
    tokens = torch.full((B, total), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, total), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, prompt_len - len(p):prompt_len] = torch.tensor(list(p), dtype=torch.long)
        mask[i, prompt_len - len(p):prompt_len] = True
    # Positions count each sequence's own tokens: a left-padded prompt sees the same rotary
    # positions as it would alone.
    positions = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    done = cap_of == 0
    cache = KVCache(model, B, total, prompt_offset=prompt_offset, prefixes=prefixes) if use_cache else None
    if not use_cache:
        model.check_prompt_offset(prompt_offset, B)
    start = 0
    for cur in range(prompt_len, total):
        if use_cache:
            logits = model(tokens[:, start:cur], positions=positions[:, start:cur], key_padding_mask=mask[:, :cur],
                           cache=cache, last_only=True)
            start = cur
        else:
            logits = model(tokens[:, :cur], positions=positions[:, :cur], key_padding_mask=mask[:, :cur],
                           last_only=True, prompt_offset=prompt_offset)
        next_token = sample_next(logits[:, -1], temperature, top_p, generator)
        next_token = torch.where(done, torch.full_like(next_token, pad_id), next_token)
        tokens[:, cur] = next_token
        mask[:, cur] = True
        positions[:, cur] = positions[:, cur - 1] + 1
        if stops:
            done |= torch.isin(next_token, stop_tensor)
        done |= cap_of <= cur + 1 - prompt_len
        if bool(done.all()):
            break
    out = []
    for i in range(B):
        new = tokens[i, prompt_len:prompt_len + caps[i]].tolist()
        first_stop = next((j for j, token in enumerate(new) if token in stops), None)
        if first_stop is not None:
            new = new[:first_stop]
        out.append(new)
    return out


def iter_answers(
    model: LLaMAAdapter,
    tokenizer,
    instructions: Sequence[str | dict],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    template: bool | str = True,
    generator: torch.Generator | None = None,
    skip_too_long: bool = False,
    prompt_offset: torch.Tensor | None = None,
    adapters: AdapterBank | None = None,
    adapter_names: Sequence[str | None] | None = None,
) -> Iterator[tuple[int, str | None]]:
    """(index, answer) for each instruction, in order, as soon as its batch is done: see
    `answer`. A prompt that leaves no room in the model's context raises a ValueError naming
    it before anything is generated, or with skip_too_long=True comes as (index, None) while
    the others are answered (and batched without it). An answer cut short by the end of the
    context (before max_new_tokens and an end of turn) comes with a ContextLimitWarning."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    context = model.args.max_seq_len
    prompts = [prompt_ids(tokenizer, item, template) for item in instructions]
    if adapter_names is not None and (isinstance(adapter_names, str) or len(adapter_names) != len(prompts)):
        raise ValueError(f"adapter_names must hold one adapter name (or None) per instruction ({len(prompts)})")
    too_long = [i for i, p in enumerate(prompts) if len(p) >= context]
    if too_long and not skip_too_long:
        i = too_long[0]
        raise ValueError(f"instructions[{i}]: its prompt of {len(prompts[i])} tokens leaves no room in the model's "
                         f"context of {context}")
    kept = [i for i in range(len(prompts)) if len(prompts[i]) < context]
    done = 0  # instructions yielded so far
    for start in range(0, len(kept), batch_size):
        batch = kept[start:start + batch_size]
        # Each answer stops at the end of the context (its own prompt's) rather than failing.
        caps = [min(max_new_tokens, context - len(prompts[i])) for i in batch]
        new = generate(model, [prompts[i] for i in batch], max_new_tokens=caps, temperature=temperature,
                       top_p=top_p, eos_id=tokenizer.stop_ids, pad_id=tokenizer.pad_id, generator=generator,
                       prompt_offset=None if prompt_offset is None else prompt_offset[batch], adapters=adapters,
                       adapter_names=None if adapter_names is None else [adapter_names[i] for i in batch])
        for i, ids, cap in zip(batch, new, caps, strict=True):
            while done < i:  # skipped prompts before this one
                yield done, None
                done += 1
            if len(ids) == cap < max_new_tokens:
                warnings.warn(f"instructions[{i}]: the answer stops at the end of the model's context of {context} "
                              f"tokens (its prompt has {len(prompts[i])}), before an end of turn",
                              ContextLimitWarning, stacklevel=2)
            yield i, tokenizer.decode(ids).strip()
            done += 1
    for i in range(done, len(prompts)):
        yield i, None


def answer(
    model: LLaMAAdapter | MultiModalLLaMAAdapter,
    tokenizer,
    instructions: Sequence[str | dict],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    template: bool | str = True,
    generator: torch.Generator | None = None,
    prompt_offset: torch.Tensor | None = None,
    images: Sequence[Any] | None = None,
    image_features: torch.Tensor | None = None,
    adapters: AdapterBank | None = None,
    adapter_names: Sequence[str | None] | None = None,
) -> list[str]:
    """Answers to instructions: each a string, an Alpaca record {"instruction", "input"} or a
    chat record {"messages"}, put in the Alpaca prompt (template True or "alpaca"), the
    tokenizer's chat template ("chat"), or as it is (False: the text is the prompt).
    An answer ends at EOS, after max_new_tokens, or at the end of the model's context. A
    prompt that fills the context raises a ValueError naming it, before any generation.
    `prompt_offset` (len(instructions), dim): one adaption-prompt offset per instruction.

    A multi-modal model answers each instruction with its image: `images` (paths, Pillow
    images, or None for no image), `image_features` (N, feature_dim), or the "image" key of
    record instructions; the per-sample prefixes are computed once per generation call.

    `adapters` (an AdapterBank) and `adapter_names` (one per instruction, None for the base
    alone) answer each instruction with its own adapter, batched over the shared base."""
    if isinstance(model, MultiModalLLaMAAdapter):
        prompt_offset = model.answer_offsets(instructions, images=images, image_features=image_features)
        model = model.llama
    elif images is not None or image_features is not None:
        raise ValueError("images: pictures need a multi-modal model (MultiModalLLaMAAdapter)")
    return [text for _, text in iter_answers(model, tokenizer, instructions, max_new_tokens=max_new_tokens,
                                             temperature=temperature, top_p=top_p, batch_size=batch_size,
                                             template=template, generator=generator, prompt_offset=prompt_offset,
                                             adapters=adapters, adapter_names=adapter_names)]
