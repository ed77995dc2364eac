"""``NLPlatformLM``: lm-eval-harness's model interface over any nlplatform model, registered as ``nlplatform``.

lm-eval turns every task into three kinds of requests; this adapter answers them with the model's own forward:

- ``loglikelihood(context, continuation)``: batched, right-padded forwards (padding after the real tokens cannot
  change a causal model's earlier logits), summing the continuation's log-probabilities; an empty context is
  conditioned on the end-of-text token (lm-eval's ``TemplateLM`` handles that and the tokenisation split).
- ``loglikelihood_rolling(text)``: the whole document's log-likelihood. Attention models score lm-eval's rolling
  windows of ``max_length`` tokens; recurrent models (a constant-size state) read the document window by window
  with their state carried across windows, so a long document costs O(length) and sees all of its context.
- ``generate_until(context, until=...)``: greedy (or sampled) decoding with the KV cache / recurrent state.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn
from tqdm.auto import tqdm

from nlplatform.errors import UserError
from nlplatform.generate import generate


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities in at least fp32 (bf16 logits are upcast; fp64 stays fp64)."""
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@register_model("nlplatform")
class NLPlatformLM(TemplateLM):
    """lm-eval model over an nlplatform checkpoint (``pretrained=PATH``) or an in-memory model and tokenizer.

    ``max_length`` defaults to the training window (``data.seq_len`` of the checkpoint's recipe): the context an
    attention model sees, and the window size in which a recurrent model reads long documents.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        max_length: int | None = None,
        batch_size: int | str = 8,
        device: str | None = None,
        dtype: str = "float32",
        **_: Any,  # lm-eval passes options some backends take (e.g. max_batch_size); they do not apply here
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm-eval's command line asks for cuda:0 by default; without CUDA, run where we can (as its HF backend).
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if pretrained is not None:
            from nlplatform.checkpoint import load_checkpoint

            loaded = load_checkpoint(pretrained, device=device)
            model, tokenizer = loaded.model, loaded.tokenizer
            max_length = max_length or loaded.recipe.data.seq_len
        if model is None or tokenizer is None:
            raise UserError("NLPlatformLM needs pretrained=CHECKPOINT, or both model= and tokenizer=")
        self.model = model.to(device=device, dtype=DTYPES[dtype]).eval()
        self.tokenizer_ = tokenizer
        self.max_length = int(max_length or 2048)
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        if self.max_length < 2 or self.batch_size < 1:
            raise UserError(f"max_length must be >= 2 and batch_size >= 1, got {self.max_length} and {batch_size}")
        self.device_ = torch.device(device)
        self.recurrent = bool(getattr(model, "recurrent", False))

    # ----------------------------------------------------------------------------------- tokenisation

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eot_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer_.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer_.decode(tokens)

    # ----------------------------------------------------------------------------------- scoring

    @torch.inference_mode()
    def _score(self, inputs: list[list[int]], targets: list[list[int]]) -> list[tuple[float, bool]]:
        """Sum of log p(targets[i] | inputs[i] so far) over the last len(targets[i]) positions of inputs[i], and
        whether every target token is the argmax: one right-padded forward for the batch."""
        width = max(len(x) for x in inputs)
        ids = torch.full((len(inputs), width), self.eot_token_id, dtype=torch.long)
        for i, x in enumerate(inputs):
            ids[i, : len(x)] = torch.tensor(x)
        logprobs = _log_softmax(self.model(ids.to(self.device_)))  # [B, T, V]
        out = []
        for i, (x, y) in enumerate(zip(inputs, targets)):
            lp = logprobs[i, len(x) - len(y) : len(x)]  # [n, V]: predictions of the target tokens
            y_t = torch.tensor(y, device=lp.device)
            total = lp.gather(-1, y_t[:, None]).sum().item()
            out.append((float(total), bool((lp.argmax(-1) == y_t).all())))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        # Longest first (lm-eval's habit): similar lengths share a batch and the first batch shows the peak memory.
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm) as bar:
            for batch in self._batches(order, lambda i: len(requests[i][1]) + len(requests[i][2])):
                inputs, targets = [], []
                for i in batch:
                    _, context, continuation = requests[i]
                    if not continuation:
                        raise UserError("a loglikelihood request has an empty continuation after tokenisation")
                    whole = (context + continuation)[:-1]  # the last token is only predicted, never read
                    if not self.recurrent:  # attention sees at most max_length tokens: keep the most recent
                        whole = whole[-self.max_length :]
                    inputs.append(whole)
                    targets.append(continuation[-len(whole) :] if len(continuation) > len(whole) else continuation)
                for i, res in zip(batch, self._score(inputs, targets)):
                    results[i] = res
                bar.update(len(batch))
        return results  # type: ignore[return-value]

    def _batches(self, order: list[int], length) -> list[list[int]]:
        """Consecutive groups of ``order`` (longest first) of at most ``batch_size`` requests and at most
        ``batch_size * max_length`` padded tokens: recurrent families read whole contexts, so one BoolQ passage can
        be many windows long, and a token budget keeps the memory of a batch what it is for attention models."""
        budget = self.batch_size * self.max_length
        batches: list[list[int]] = []
        for i in order:
            if (
                batches
                and len(batches[-1]) < self.batch_size
                and (len(batches[-1]) + 1) * length(batches[-1][0]) <= budget
            ):
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    @torch.inference_mode()
    def _rolling_recurrent(self, tokens: list[int]) -> float:
        """log p(document) read in windows of max_length tokens with the recurrent state carried across them:
        exactly one forward over the whole document, at constant memory."""
        inputs = [self.eot_token_id] + tokens[:-1]
        state = self.model.init_state(1, len(inputs), self.device_, next(self.model.parameters()).dtype)
        total = 0.0
        for start in range(0, len(inputs), self.max_length):
            x = torch.tensor([inputs[start : start + self.max_length]], device=self.device_)
            y = torch.tensor(tokens[start : start + self.max_length], device=self.device_)
            logits, state = self.model.step(x, state)
            total += _log_softmax(logits[0]).gather(-1, y[:, None]).sum().item()
        return total

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in tqdm([r.args for r in requests], desc="loglikelihood_rolling", disable=disable_tqdm):
            tokens = self.tok_encode(text)
            if not tokens:
                out.append(0.0)
            elif self.recurrent:
                out.append(self._rolling_recurrent(tokens))
            else:
                windows = [
                    make_disjoint_window(w)
                    for w in get_rolling_token_windows(tokens, self.eot_token_id, self.max_length, context_len=1)
                ]
                reqs = [(None, context, target) for context, target in windows]
                out.append(sum(ll for ll, _ in self._loglikelihood_tokens(reqs, disable_tqdm=True)))
        return out

    # ----------------------------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="generate_until", disable=disable_tqdm):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            prompt = self.tok_encode(context) or [self.eot_token_id]
            if not self.recurrent:
                prompt = prompt[-max(1, self.max_length - max_new) :]

            def stop(new: list[int], until: list[str] = until) -> bool:
                text = self.tok_decode(new)
                return any(s in text for s in until)

            new = generate(
                self.model,
                prompt,
                max_new_tokens=max_new,
                temperature=temperature,
                eos_id=self.eot_token_id,
                seed=0,
                should_stop=stop if until else None,
            )
            text = self.tok_decode([t for t in new if t != self.eot_token_id])
            for s in until:
                text = text.split(s)[0]
            out.append(text)
        return out
