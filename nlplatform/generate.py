"""Autoregressive sampling from any language model of the platform.

Models with ``init_state(batch_size, max_len, device, dtype)`` and ``step(input_ids, state) -> (logits, state)``
(a KV cache for attention, a recurrent memory for the linear-attention families) are decoded incrementally: the
prompt in one step, then one token per step. Other models are re-run on the whole context at every step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _check_args(prompt_ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty: give at least one token (e.g. a beginning- or end-of-text id)")
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in prompt_ids):
        raise ValueError("prompt_ids must be non-negative integer token ids")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be > 0 or None (no truncation), got {top_k}")


def _next_token(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> int:
    """Pick a token from the logits [V] of the last position."""
    logits = logits.float().cpu()  # sample on the CPU, so a seed gives the same tokens on any device
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    model: nn.Module,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    should_stop: Callable[[list[int]], bool] | None = None,
) -> list[int]:
    """Sample up to ``max_new_tokens`` tokens after ``prompt_ids``; return the new tokens only.

    ``temperature`` 0 is greedy decoding; ``top_k`` keeps the k most likely tokens; generation stops after
    ``eos_id`` is produced (it is included in the result), or once ``should_stop(new_tokens)`` is true (stop
    strings); ``seed`` makes sampling reproducible without touching the
    global RNG. The model is run in eval mode under ``torch.inference_mode`` and its mode is restored afterwards.
    """
    _check_args(prompt_ids, max_new_tokens, temperature, top_k)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    incremental = callable(getattr(model, "init_state", None)) and callable(getattr(model, "step", None))

    was_training = model.training
    model.eval()
    new: list[int] = []
    try:
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # [1, T]
            if incremental:
                # The last sampled token is never fed back, hence the -1.
                state = model.init_state(1, len(prompt_ids) + max_new_tokens - 1, device, dtype)
                logits, state = model.step(ids, state)
            else:
                logits = model(ids)
            while True:
                token = _next_token(logits[0, -1], temperature, top_k, generator)
                new.append(token)
                if len(new) == max_new_tokens or token == eos_id or (should_stop is not None and should_stop(new)):
                    break
                step_ids = torch.tensor([[token]], dtype=torch.long, device=device)
                if incremental:
                    logits, state = model.step(step_ids, state)
                else:
                    ids = torch.cat((ids, step_ids), dim=1)
                    logits = model(ids)
    finally:
        model.train(was_training)
    return new
