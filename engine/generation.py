"""Generating answers with a causal LM: greedy or sampled, many prompts batched, streamed as typed events.

The one generation core of finetui. `finetui generate` and `chat`, the TUI's try screen and export's self-check
call it, and it sits beside `engine.data` (below training and inference) so that training can call it too. It takes
prompts as token ids, rendered as training rendered them (`engine.data.prompt_token_ids`), and runs transformers'
own `model.generate` (KV cache, sampling, repetition penalty) over batches padded on the left, the side a decoder
continues from: under greedy decoding a batch gives the answers each prompt gets alone. Answers end at the
model's end-of-sequence or the chat template's end-of-turn token (`end_token_ids`), at `max_new_tokens`, or when
`stop` is set; each new piece of text can be sent to a sink as it comes (`TokensGenerated`), with tokens/s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from engine.events import GenerationDone, TokensGenerated
from engine.sampling import GenerationSettings
from engine.sinks import EventSink

DEFAULT_BATCH_SIZE = 16
_PROBE = "finetui-end-of-turn-probe"


@dataclass(frozen=True)
class Answer:
    """One prompt's answer: its tokens (the end token left out), text, and how long it took."""

    index: int
    token_ids: list[int]
    text: str
    elapsed_s: float
    stop_reason: str
    """"end" (an end token), "length" (max_new_tokens) or "stopped"."""

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


def end_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config: GenerationConfig | None = None) -> list[int]:
    """The tokens that end an answer: the tokenizer's eos, the model's generation config's eos ids, and the token
    the chat template closes an assistant turn with (`<|im_end|>`, `<|eot_id|>`, ...)."""
    found: list[int] = []
    configured = generation_config.eos_token_id if generation_config is not None else None
    for ids in (tokenizer.eos_token_id, configured, _end_of_turn_id(tokenizer)):
        for token in ids if isinstance(ids, list) else [ids]:
            if token is not None and token not in found:
                found.append(int(token))
    return found


def _end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token a chat template writes right after an assistant message, if it has one."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception:  # a template with rules of its own (a system turn first, ...): no end-of-turn token known
        return None
    after = text[text.rfind(_PROBE) + len(_PROBE) :].lstrip(" ")
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if not ids:
        return None
    added = tokenizer.added_tokens_decoder.get(ids[0])
    return ids[0] if ids[0] in tokenizer.all_special_ids or (added is not None and added.special) else None


def generation_config(settings: GenerationSettings, *, end_ids: Sequence[int], pad_id: int | None) -> GenerationConfig:
    """The transformers GenerationConfig for `settings` (what `generate` passes to `model.generate`)."""
    options: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.sampling,
        "eos_token_id": list(end_ids),
        "pad_token_id": pad_id if pad_id is not None else end_ids[0],
        "repetition_penalty": settings.repetition_penalty,
        "use_cache": True,
    }
    if settings.sampling:
        options.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    return GenerationConfig(**options)


def left_padded(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of prompts padded on the left to the longest."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            mask[row, width - len(ids) :] = 1
    return input_ids.to(device), mask.to(device)


def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings,
    *,
    end_ids: Sequence[int],
    sink: EventSink | None = None,
    stop: threading.Event | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    model_name: str = "fine-tuned",
) -> list[Answer]:
    """Answer every prompt (token ids), in batches of `batch_size` prompts of similar length; answers in prompt order.

    With a `sink`, each answer streams as `TokensGenerated` events and ends with `GenerationDone`. A set `stop` ends
    the answers being generated at their next token (and skips the rest). `seed` makes sampling repeatable.
    """
    if any(not ids for ids in prompts):
        raise ValueError("every prompt needs at least one token")
    order = sorted(range(len(prompts)), key=lambda index: -len(prompts[index]))
    config = generation_config(settings, end_ids=end_ids, pad_id=tokenizer.pad_token_id)
    device = next(model.parameters()).device
    answers: dict[int, Answer] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            tracker = _Tracker(rows, tokenizer, set(end_ids), sink, model_name, stop)
            if stop is None or not stop.is_set():
                input_ids, mask = left_padded([prompts[row] for row in rows], config.pad_token_id, device)
                criteria = StoppingCriteriaList([_StopRequested(stop)] if stop is not None else [])
                model.generate(  # type: ignore[operator]
                    input_ids=input_ids,
                    attention_mask=mask,
                    generation_config=config,
                    stopping_criteria=criteria,
                    streamer=tracker,
                )
            answers.update((answer.index, answer) for answer in tracker.finish())
    return [answers[index] for index in range(len(prompts))]


class _StopRequested(StoppingCriteria):
    """Ends every sequence of the batch once `stop` is set (Ctrl-C in `finetui chat`, a key in the TUI)."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.stop.is_set(), dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class _Tracker(BaseStreamer):
    """What `model.generate` hands its streamer, per batch row: tokens, where each answer ended, and, for a sink,
    the new text of each answer as events (text held back while it ends inside a multi-byte character)."""

    def __init__(
        self,
        rows: list[int],
        tokenizer: PreTrainedTokenizerBase,
        end_ids: set[int],
        sink: EventSink | None,
        model_name: str,
        stop: threading.Event | None,
    ) -> None:
        self.rows, self.tokenizer, self.end_ids = rows, tokenizer, end_ids
        self.sink, self.model_name, self.stop = sink, model_name, stop
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.shown = [""] * len(rows)
        self.ended: list[tuple[float, str] | None] = [None] * len(rows)
        self.started = time.perf_counter()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call hands over the prompts
            self.prompt_seen = True
            return
        now = time.perf_counter()
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.ended[row] is not None:
                continue
            if token in self.end_ids:
                self._end(row, now, "end")
                continue
            self.tokens[row].append(token)
            if self.sink is not None:
                self._stream(row, now)

    def end(self) -> None:
        now = time.perf_counter()
        reason = "stopped" if self.stop is not None and self.stop.is_set() else "length"
        for row in range(len(self.rows)):
            if self.ended[row] is None:
                self._end(row, now, reason)

    def _stream(self, row: int, now: float, *, final: bool = False) -> None:
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        if (text.endswith("\ufffd") and not final) or len(text) <= len(self.shown[row]):
            return
        piece, self.shown[row] = text[len(self.shown[row]) :], text
        elapsed = now - self.started
        self.sink.emit(  # type: ignore[union-attr]
            TokensGenerated(
                index=self.rows[row],
                text=piece,
                tokens=len(self.tokens[row]),
                tokens_per_second=len(self.tokens[row]) / elapsed if elapsed > 0 else 0.0,
                model=self.model_name,
            )
        )

    def _end(self, row: int, now: float, reason: str) -> None:
        self.ended[row] = (now - self.started, reason)
        if self.sink is not None:
            self._stream(row, now, final=True)  # text held back (an incomplete character) is the answer's too
            answer = self._answer(row)
            self.sink.emit(
                GenerationDone(
                    index=answer.index,
                    text=answer.text,
                    tokens=answer.tokens,
                    tokens_per_second=answer.tokens_per_second,
                    elapsed_s=answer.elapsed_s,
                    stop_reason=reason,
                    model=self.model_name,
                )
            )

    def _answer(self, row: int) -> Answer:
        elapsed, reason = self.ended[row] or (time.perf_counter() - self.started, "stopped")
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        return Answer(self.rows[row], list(self.tokens[row]), text, elapsed, reason)

    def finish(self) -> list[Answer]:
        """Every row's answer (rows never generated, when stopped before their batch, end as "stopped")."""
        if self.stop is not None and self.stop.is_set():
            self.end()
        return [self._answer(row) for row in range(len(self.rows))]
