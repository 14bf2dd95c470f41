"""How to decode an answer: greedy or sampled, and how long it may get.

The settings of `finetui generate`, `chat`, the TUI's try screen and export's self-check, validated here before
torch loads, so that `--max-new-tokens 0` or `--top-p 2` is one line naming the option, never a traceback from
inside generation.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.config import ConfigError, format_validation_error


class GenerationSettings(BaseModel):
    """Decoding settings; the defaults decode greedily (temperature 0), which is deterministic."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    max_new_tokens: int = Field(default=256, ge=1)
    """The most tokens an answer may have (it ends earlier at an end-of-sequence or end-of-turn token)."""
    temperature: float = Field(default=0.0, ge=0.0)
    """0 decodes greedily (the most likely token each step); above 0 samples, flatter as it grows."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Sampling only: keep the smallest set of tokens whose probabilities add up to top_p (1 keeps all)."""
    top_k: int = Field(default=0, ge=0)
    """Sampling only: keep the k most likely tokens (0 keeps all)."""
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    """Divide the scores of tokens already in the text by this (1 leaves them; 1.1-1.3 discourages loops)."""
    seed: int | None = None
    """Sampling only: the same seed gives the same answers (None: different each time)."""

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    @classmethod
    def checked(cls, **values: Any) -> GenerationSettings:
        """Settings from options (None leaves the default); a bad value is a ConfigError naming it."""
        try:
            return cls.model_validate({key: value for key, value in values.items() if value is not None})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc)) from None
