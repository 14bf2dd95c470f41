"""The generation core (`engine.generation`) on the tiny random Llama: batching, seeds, end tokens, streaming, stop."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from engine.config import ConfigError, ModelConfig
from engine.events import EVENT_TYPES, GenerationDone, TokensGenerated, event_from_dict
from engine.generation import end_token_ids, generate, generation_config
from engine.models import load_model, load_tokenizer
from engine.sampling import GenerationSettings
from engine.sinks import ListSink

PROMPTS = [
    "Hello there, how are",
    "a",
    "The quick brown fox jumps over the lazy dog, then",
    "xyz 123",
    "Once upon a time",
    "Ünïcödé ✓",
    "1, 2, 3,",
]


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    cfg = ModelConfig(id="builtin:tiny-llama")
    return load_model(cfg, num_labels=None).eval(), load_tokenizer(cfg)


def ids_of(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [tokenizer(text)["input_ids"] for text in texts]


def test_batched_greedy_answers_equal_one_prompt_at_a_time(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    prompts = ids_of(tokenizer, PROMPTS)
    settings = GenerationSettings(max_new_tokens=24)
    alone = [generate(model, tokenizer, [ids], settings, end_ids=[tokenizer.eos_token_id])[0] for ids in prompts]
    for batch_size in (3, len(prompts)):
        batched = generate(model, tokenizer, prompts, settings, end_ids=[tokenizer.eos_token_id], batch_size=batch_size)
        assert [answer.token_ids for answer in batched] == [answer.token_ids for answer in alone]
        assert [answer.index for answer in batched] == list(range(len(prompts)))
    assert len({tuple(answer.token_ids) for answer in alone}) > 1  # the prompts get different answers
    assert {answer.stop_reason for answer in alone} <= {"end", "length"}
    assert tokenizer.padding_side == "right"  # the run's tokenizer is left as training set it up


def test_greedy_answers_are_those_of_plain_generate_with_the_kv_cache(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    settings = GenerationSettings(max_new_tokens=16)
    (prompt,) = ids_of(tokenizer, [PROMPTS[2]])
    (answer,) = generate(model, tokenizer, [prompt], settings, end_ids=[tokenizer.eos_token_id])
    config = generation_config(settings, end_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id)
    assert config.use_cache and not config.do_sample
    uncached = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, use_cache=False)
    assert answer.token_ids == uncached[0, len(prompt) :].tolist()


def test_seeded_sampling_repeats_and_other_seeds_differ(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    prompts = ids_of(tokenizer, PROMPTS[:3])
    end = [tokenizer.eos_token_id]

    def sample(seed: int) -> list[list[int]]:
        settings = GenerationSettings(max_new_tokens=12, temperature=1.2, top_p=0.95, top_k=100, seed=seed)
        return [answer.token_ids for answer in generate(model, tokenizer, prompts, settings, end_ids=end)]

    torch.manual_seed(0)
    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    greedy = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=12), end_ids=end)
    assert [answer.token_ids for answer in greedy] != first
    state = torch.random.get_rng_state()
    sample(9)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is left alone


def test_an_answer_stops_at_its_end_token(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    prompts = ids_of(tokenizer, PROMPTS)
    free = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=24), end_ids=[tokenizer.eos_token_id])
    # a token the model produces after a few others: made the end token, the answer stops right before it
    index, position = next(
        (answer.index, position)
        for answer in free
        for position, token in enumerate(answer.token_ids)
        if position > 0 and token not in answer.token_ids[:position]
    )
    end = free[index].token_ids[position]
    (stopped,) = generate(model, tokenizer, [prompts[index]], GenerationSettings(max_new_tokens=24), end_ids=[end])
    assert stopped.token_ids == free[index].token_ids[:position]
    assert stopped.stop_reason == "end"


def test_answers_stream_as_events_with_tokens_per_second(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    sink = ListSink()
    settings = GenerationSettings(max_new_tokens=10)
    answers = generate(model, tokenizer, ids_of(tokenizer, PROMPTS[:3]), settings, end_ids=[257], sink=sink)
    for answer in answers:
        pieces = [e for e in sink.events if isinstance(e, TokensGenerated) and e.index == answer.index]
        done = [e for e in sink.events if isinstance(e, GenerationDone) and e.index == answer.index]
        assert "".join(piece.text for piece in pieces) == answer.text == done[0].text
        assert [piece.tokens for piece in pieces] == sorted(piece.tokens for piece in pieces)
        assert len(done) == 1 and done[0].tokens == 10 and done[0].tokens_per_second > 0
    for event in sink.events:
        assert EVENT_TYPES[event.type] is type(event)
        assert event_from_dict(event.to_dict()) == event


def test_a_stop_request_ends_the_answer_at_the_next_token(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    stop = threading.Event()

    class StopAfterThree(ListSink):
        def emit(self, event: Any) -> None:
            super().emit(event)
            if isinstance(event, TokensGenerated) and event.tokens >= 3:
                stop.set()

    settings = GenerationSettings(max_new_tokens=200)
    prompts = ids_of(tokenizer, PROMPTS[:2])
    answers = generate(model, tokenizer, prompts, settings, end_ids=[257], sink=StopAfterThree(), stop=stop)
    assert [answer.stop_reason for answer in answers] == ["stopped", "stopped"]
    assert all(3 <= answer.tokens <= 4 for answer in answers)
    later = generate(model, tokenizer, prompts, settings, end_ids=[257], stop=stop, batch_size=1)
    assert [(answer.tokens, answer.stop_reason) for answer in later] == [(0, "stopped"), (0, "stopped")]


def test_end_tokens_include_the_chat_templates_end_of_turn() -> None:
    backend = Tokenizer(models.WordLevel({"[unk]": 0, "hi": 1}, unk_token="[unk]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["</s>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[unk]")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    eos, im_end = tokenizer.convert_tokens_to_ids(["</s>", "<|im_end|>"])
    assert end_token_ids(tokenizer) == [eos, im_end]
    tokenizer.chat_template = None
    assert end_token_ids(tokenizer) == [eos]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens: Input should be greater than or equal to 1 (got 0)"),
        ({"top_p": 1.5}, "top_p: Input should be less than or equal to 1"),
        ({"temperature": -1}, "temperature: Input should be greater than or equal to 0"),
    ],
)
def test_bad_settings_are_one_line_naming_the_option(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match="^" + fragment.replace("(", r"\(").replace(")", r"\)")):
        GenerationSettings.checked(**options)
