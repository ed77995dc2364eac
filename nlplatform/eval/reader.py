"""Reading a prompt once and scoring continuations from copies of the model's state after it: how long-context
probes score their candidate answers and class-incremental intents their labels.

Models with ``init_state``/``step`` (all families: a KV cache for attention, the recurrent or neural memory for the
others) read the prompt once, in O(length) for the recurrent ones; each continuation then starts from a copy of that
state. Other modules are re-run on prompt + continuation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def clone_state(state):
    """A copy of a model's decoding state that later steps can change without touching the original: tensors are
    cloned inside lists, tuples, dicts and objects (dataclasses, KV caches). Tensors are detached, since HOPE's fast
    weights carry autograd history from its inner gradient steps, which ``copy.deepcopy`` refuses."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # a NamedTuple
        return type(state)(*(clone_state(x) for x in state))
    if isinstance(state, (list, tuple)):
        return type(state)(clone_state(x) for x in state)
    if isinstance(state, dict):
        return {k: clone_state(v) for k, v in state.items()}
    if hasattr(state, "__dict__") and not isinstance(state, type):
        new = copy.copy(state)
        new.__dict__.update({k: clone_state(v) for k, v in vars(state).items()})
        return new
    return state


class PromptReader:
    """The prompt read once; continuations scored or decoded from copies of the state after it."""

    def __init__(self, model: nn.Module, prompt: list[int], room: int) -> None:
        param = next(model.parameters())
        self.model, self.device = model, param.device
        self.incremental = callable(getattr(model, "init_state", None)) and callable(getattr(model, "step", None))
        ids = torch.tensor([prompt], device=self.device)
        if self.incremental:
            self.state = model.init_state(1, len(prompt) + room, self.device, param.dtype)
            logits, self.state = model.step(ids, self.state)
        else:
            self.prompt, logits = ids, model(ids)
        self.first = logits[0, -1].float().log_softmax(-1)  # log p(first continuation token | prompt)

    def logprob(self, continuation: list[int]) -> float:
        """log p(continuation | prompt), summed over its tokens."""
        total = self.first[continuation[0]]
        if len(continuation) > 1:
            ids = torch.tensor([continuation[:-1]], device=self.device)
            logits = self._continue(ids)[0, -len(continuation) + 1 :].float().log_softmax(-1)
            total = total + logits.gather(1, torch.tensor(continuation[1:], device=self.device)[:, None]).sum()
        return float(total)

    def greedy(self, n: int) -> list[int]:
        token = int(self.first.argmax())
        out = [token]
        state = clone_state(self.state) if self.incremental else None
        ids = self.prompt if not self.incremental else None
        while len(out) < n:
            step = torch.tensor([[token]], device=self.device)
            if self.incremental:
                logits, state = self.model.step(step, state)
            else:
                ids = torch.cat((ids, step), dim=1)
                logits = self.model(ids)
            token = int(logits[0, -1].argmax())
            out.append(token)
        return out

    def _continue(self, ids: torch.Tensor) -> torch.Tensor:
        if self.incremental:
            logits, _ = self.model.step(ids, clone_state(self.state))
            return logits
        return self.model(torch.cat((self.prompt, ids), dim=1))
