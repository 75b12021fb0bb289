"""The OpenAI request bodies this server reads (pydantic) and the error shape it answers with.

Unknown fields are accepted and ignored, as OpenAI's clients send some (user, metadata) that do
not apply to this model; fields that do apply are checked.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ImageURL(_Open):
    url: str
    detail: Optional[str] = None


class ContentPart(_Open):
    type: str
    text: Optional[str] = None
    image_url: Optional[ImageURL] = None


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None


class StreamOptions(_Open):
    include_usage: bool = False


class ChatRequest(_Open):
    model: Optional[str] = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    seed: Optional[int] = None
    n: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


class ImageGenerationRequest(_Open):
    prompt: str = Field(min_length=1)
    model: Optional[str] = None
    n: int = 1
    size: Optional[str] = None
    response_format: Optional[Literal["b64_json", "url"]] = None
    seed: Optional[int] = None
    # EMMA's sampler settings (not in OpenAI's API; send them with the client's extra_body).
    steps: Optional[int] = None
    cfg: Optional[float] = None


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
