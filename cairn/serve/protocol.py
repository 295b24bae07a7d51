"""OpenAI's request and response shapes, as pydantic models: what the server validates and what /openapi.json shows.

Every field of OpenAI's chat and completions requests is declared: those cairn honours, those that change nothing
(user, metadata, caching hints) and those it cannot honour, which are refused with a 400 naming the field rather
than ignored (tools, JSON modes, audio, ...). Fields no OpenAI request has are ignored, as other vendors' are.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import models_json_schema
from pydantic_core import PydanticCustomError

_CONFIG = ConfigDict(extra="ignore", use_attribute_docstrings=True)


def _refuse(why: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported", why)


class StreamOptions(BaseModel):
    model_config = _CONFIG
    include_usage: bool = False
    """Send a last chunk with the token usage (and no choices)."""


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)
    type: str
    """Only "text" parts are served; image, audio and file parts are refused (the models are text-only)."""
    text: str | None = None
    """The part's text."""


class Message(BaseModel):
    model_config = _CONFIG
    role: str = Field(min_length=1, max_length=64)
    """system, developer (treated as system), user or assistant; others go to the chat template as they are."""
    content: str | list[ContentPart] | None = None
    """A string or a list of text parts (joined with newlines)."""
    name: str | None = None
    """The author's name, passed to the chat template."""
    tool_calls: list[dict[str, Any]] | None = None
    """Refused when not empty: cairn does not call tools."""
    function_call: dict[str, Any] | None = None
    """Refused: cairn does not call functions."""

    @field_validator("role")
    @classmethod
    def _no_tool_roles(cls, role: str) -> str:
        if role in ("tool", "function"):
            raise _refuse(f"{role!r} messages answer tool calls, which cairn does not make")
        return role

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content):
        for part in content if isinstance(content, list) else ():
            if part.type != "text":
                raise PydanticCustomError(
                    "unsupported", f"content parts of type {part.type!r} are not supported: the served models read "
                    "text only; send the content as a string or as parts of type 'text'")
            if part.text is None:
                raise PydanticCustomError("missing", "a content part of type 'text' needs a 'text' string")
        return content

    @field_validator("tool_calls", "function_call")
    @classmethod
    def _no_calls(cls, value, info):
        if value:
            raise _refuse("cairn does not call tools or functions")
        return value

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(part.text for part in self.content)

    def for_template(self) -> dict:
        """The message as the chat template sees it; OpenAI's `developer` role is the `system` role."""
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        return out


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)
    type: Literal["text", "json_object", "json_schema"]
    """Only "text": cairn does not constrain its output to JSON."""


class _Common(BaseModel):
    """Fields chat and completions share."""

    model_config = _CONFIG
    model: str = Field(min_length=1)
    """A served model's name (GET /v1/models)."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Most tokens to generate."""
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    """0 is greedy; default 1."""
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    n: int = Field(default=1, ge=1, le=16)
    """Choices to generate for each prompt."""
    stop: str | list[str] | None = None
    """Up to 16 strings that end generation (not included in the text)."""
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    """Same seed, same request, same output (choice i of n uses seed + i)."""
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    """Subtracted from the logits of tokens already generated."""
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    """Subtracted, times their count, from the logits of tokens already generated."""
    logit_bias: dict[str, float] | None = None
    """Token id (as a string) -> bias in [-100, 100] added to its logit before sampling; at most 300 entries."""
    stream: bool = False
    """Send server-sent events, one chunk per token, then `data: [DONE]`."""
    stream_options: StreamOptions | None = None
    """Streaming options."""
    user: str | None = None
    """Accepted, not used."""
    top_k: int | None = Field(default=None, ge=0)
    """Extension: keep the k most likely tokens (0 keeps all)."""
    min_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    """Extension: drop tokens less likely than min_p times the most likely one."""
    repetition_penalty: float | None = Field(default=None, gt=0, le=10, allow_inf_nan=False)
    """Extension: divide the logits of tokens already seen (prompt and output) by this (multiply when negative)."""
    ignore_eos: bool = False
    """Extension: keep generating past end-of-sequence tokens."""

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_and_range(cls, bias):
        if bias is None:
            return bias
        if len(bias) > 300:
            raise PydanticCustomError("too_long", f"at most 300 token ids, got {len(bias)}")
        for key, value in bias.items():
            if not key.isdigit():
                raise PydanticCustomError("token_id", f"keys must be token ids (digits), got {key!r}")
            if not -100 <= value <= 100:  # NaN fails too
                raise PydanticCustomError("range", f"biases must be in [-100, 100], got {value} for token {key}")
        return bias


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    """The conversation, rendered with the model's chat template."""
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """Most tokens to generate (wins over max_tokens); default: what the context leaves."""
    logprobs: bool = False
    """Return each generated token's logprob."""
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    """With logprobs: this many most likely alternatives per token."""
    response_format: ResponseFormat | None = None
    """Only {"type": "text"}."""
    tools: list[dict[str, Any]] | None = None
    """Refused unless empty: cairn does not call tools."""
    tool_choice: str | dict[str, Any] | None = None
    """Only "none" or "auto" (there are no tools to choose)."""
    functions: list[dict[str, Any]] | None = None
    """Refused unless empty: cairn does not call functions."""
    function_call: str | dict[str, Any] | None = None
    """Only "none" or "auto"."""
    parallel_tool_calls: bool | None = None
    """Accepted; there are no tool calls."""
    audio: dict[str, Any] | None = None
    """Refused: text output only."""
    modalities: list[str] | None = None
    """Only ["text"]."""
    prediction: dict[str, Any] | None = None
    """Refused: predicted outputs are not supported."""
    web_search_options: dict[str, Any] | None = None
    """Refused: cairn does not search the web."""
    reasoning_effort: str | None = None
    """Refused: the served models have no reasoning-effort setting."""
    verbosity: str | None = None
    """Refused: the served models have no verbosity setting."""
    moderation: dict[str, Any] | None = None
    """Refused: cairn does not moderate."""
    store: bool | None = None
    """Only false: cairn stores no completions."""
    metadata: dict[str, str] | None = None
    """Accepted, not used."""
    service_tier: str | None = None
    """Accepted, not used."""
    prompt_cache_key: str | None = None
    """Accepted, not used."""
    prompt_cache_retention: str | None = None
    """Accepted, not used."""
    prompt_cache_options: dict[str, Any] | None = None
    """Accepted, not used."""
    safety_identifier: str | None = None
    """Accepted, not used."""

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, fmt):
        if fmt is not None and fmt.type != "text":
            raise _refuse(f"{fmt.type!r} is not supported (nothing constrains the output to JSON); use type 'text'")
        return fmt

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value, info):
        if value:
            raise _refuse("cairn does not call tools or functions; send none")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_choice(cls, value, info):
        if value not in (None, "none", "auto"):
            raise _refuse("there are no tools to call; send 'none' or leave it out")
        return value

    @field_validator("audio", "prediction", "web_search_options", "reasoning_effort", "verbosity", "moderation")
    @classmethod
    def _unsupported(cls, value, info):
        if value is not None:
            raise _refuse("not supported by cairn; leave it out")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value):
        if value is not None and any(m != "text" for m in value):
            raise _refuse("the served models write text only; send ['text']")
        return value

    @field_validator("store")
    @classmethod
    def _no_store(cls, value):
        if value:
            raise _refuse("cairn stores no completions; send false or leave it out")
        return value


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    """A string, a list of strings, a list of token ids, or a list of token-id lists (n choices each)."""
    logprobs: int | None = Field(default=None, ge=0, le=5)
    """Return each token's logprob and this many most likely alternatives."""
    echo: bool = False
    """Put the prompt before the completion (with logprobs: the prompt tokens' logprobs too)."""
    best_of: int | None = Field(default=None, ge=1, le=16)
    """Generate this many per prompt and return the n with the highest cumulative logprob (not with stream)."""
    suffix: str | None = None
    """Refused unless empty: insertion needs a fill-in-the-middle model."""

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:
            raise _refuse("inserting text needs a fill-in-the-middle model, which cairn does not serve; leave it out")
        return value


# ----- responses


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cairn"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    """Prompt tokens whose keys and values came from the prefix cache (whole KV blocks of an earlier request with
    the same token prefix) instead of being computed."""


class Usage(BaseModel):
    prompt_tokens: int
    """Counted once per prompt, not once per choice."""
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class TextCompletion(BaseModel):
    """A completion, or (streaming) one server-sent event of one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def openapi_schemas() -> dict[str, dict]:
    """JSON schemas of every request and response model, keyed by name, for /openapi.json's components."""
    requests = [ChatCompletionRequest, CompletionRequest]
    responses = [ChatCompletion, ChatCompletionChunk, TextCompletion, ModelList, ErrorResponse]
    _, top = models_json_schema([(m, "validation") for m in requests] + [(m, "serialization") for m in responses],
                                ref_template="#/components/schemas/{model}")
    return top["$defs"]
