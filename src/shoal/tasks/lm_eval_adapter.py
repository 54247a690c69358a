"""A minimal lm-evaluation-harness ``LM`` over a live causal LM (no reload, no accelerate).

lm-eval's own ``HFLM(pretrained=model)`` needs the ``accelerate`` package; when that is
missing, :class:`LiveLM` answers the three request kinds itself:

- ``loglikelihood(context, continuation)``: log p(continuation | context) summed over the
  continuation's tokens (the tokens of ``context + continuation`` after those of
  ``context``, as HFLM splits them), and whether every token is the greedy one;
- ``loglikelihood_rolling(text)``: log p(text), each token given all before it;
- ``generate_until(context, {until, max_gen_toks})``: greedy generation cut at the first
  stop string.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["make_live_lm"]


def _device(model: Any) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def make_live_lm(model: Any, tokenizer: Any, batch_size: int = 8) -> Any:
    """An lm-eval ``LM`` scoring ``model`` in place (class built lazily: lm-eval is optional)."""
    from lm_eval.api.model import LM

    class LiveLM(LM):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.model, self.tok, self.batch_size = model, tokenizer, batch_size

        def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            whole = list(self.tok(context + continuation)["input_ids"])
            ctx = list(self.tok(context)["input_ids"])
            if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
                return ctx, whole[len(ctx) :]
            return ctx, list(self.tok(continuation, add_special_tokens=False)["input_ids"])

        @torch.inference_mode()
        def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
            out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
            order = sorted(range(len(pairs)), key=lambda k: -len(pairs[k][0]) - len(pairs[k][1]))
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                seqs = [pairs[k][0] + pairs[k][1] for k in rows]
                width = max(len(s) for s in seqs)
                ids = torch.full((len(rows), width), pad, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, s in enumerate(seqs):
                    ids[r, : len(s)] = torch.tensor(s)
                    mask[r, : len(s)] = 1
                dev = _device(self.model)
                logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
                logp = torch.log_softmax(logits.float(), dim=-1).cpu()
                for r, k in enumerate(rows):
                    ctx, cont = pairs[k]
                    pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
                    target = torch.tensor(cont)
                    lp = logp[r, pos].gather(1, target[:, None]).sum()
                    greedy = bool((logp[r, pos].argmax(-1) == target).all())
                    out[k] = (float(lp), greedy)
            return out

        def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
            return self._score([self._split(*req.args[:2]) for req in requests])

        def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
            bos = self.tok.bos_token_id if self.tok.bos_token_id is not None else None
            pairs = []
            for req in requests:
                ids = list(self.tok(req.args[0], add_special_tokens=False)["input_ids"])
                first = [bos] if bos is not None else ids[:1]
                pairs.append((first, ids if bos is not None else ids[1:]))
            return [lp for lp, _ in self._score(pairs)]

        def generate_until(self, requests: list[Any]) -> list[str]:
            from shoal.tasks.generation import generate_answers

            out = []
            for req in requests:
                context, kwargs = req.args[0], dict(req.args[1] or {})
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                text = generate_answers(
                    self.model,
                    self.tok,
                    [context],
                    max_new_tokens=int(kwargs.get("max_gen_toks", 32)),
                    batch_size=1,
                )[0]
                for stop in until:
                    text = text.split(stop, 1)[0]
                out.append(text)
            return out

    return LiveLM()
