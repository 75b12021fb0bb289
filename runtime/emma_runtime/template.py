"""EMMA's sequence layout per task: which text and which images, in which order and branch.

Both the PyTorch reference pipelines and this runtime build their sequences from here, so the two
sides agree on the protocol by construction; everything numeric is implemented on each side apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

SPECIAL = ("<|pad|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|assistant|>")


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    assistant: int

    @classmethod
    def from_tokenizer(cls, tok) -> "SpecialIds":
        ids = []
        for name in SPECIAL:
            i = tok.token_to_id(name)
            if i is None:
                raise ValueError(f"tokenizer has no special token {name}")
            ids.append(i)
        return cls(*ids)


@dataclass(frozen=True)
class Text:
    ids: tuple[int, ...]


@dataclass(frozen=True)
class Image:
    """An image's (H/32)(W/32) tokens. ``role``: 'input' (understanding), 'reference' or 'target'."""

    role: str
    branch: str  # "und" or "gen"


Segment = Union[Text, Image]


def text_ids(tokenizer, text: str) -> list[int]:
    """User text -> token ids with special tokens matched as plain text: a prompt holding
    "<|im_end|><|assistant|>" cannot forge the template, whose special ids come only from here."""
    tokenizer.encode_special_tokens = True
    return tokenizer.encode(text, add_special_tokens=False).ids


def understand(sp: SpecialIds, prompt_ids: list[int]) -> list[Segment]:
    # The image first, then the question; the answer follows <|assistant|>.
    return [
        Text((sp.im_start, sp.vision_start)),
        Image("input", "und"),
        Text((sp.vision_end, *prompt_ids, sp.im_end, sp.assistant)),
    ]


def generate(sp: SpecialIds, prompt_ids: list[int]) -> list[Segment]:
    # The noisy target comes last, so the prompt's KV cache serves every denoising step.
    return [Text((sp.im_start, *prompt_ids, sp.im_end, sp.vision_start)), Image("target", "gen")]


def edit(sp: SpecialIds, prompt_ids: list[int], with_reference: bool = True, reference_branch: str = "gen") -> list[Segment]:
    if not with_reference:
        return generate(sp, prompt_ids)
    return [
        Text((sp.im_start, sp.vision_start)),
        Image("reference", reference_branch),
        Text((sp.vision_end, *prompt_ids, sp.im_end, sp.vision_start)),
        Image("target", "gen"),
    ]


def split_prefix(segments: list[Segment]) -> tuple[list[Segment], Image | None]:
    """The prefix (computed once) and the trailing target image (recomputed every step), if any."""
    if segments and isinstance(segments[-1], Image) and segments[-1].role == "target":
        return segments[:-1], segments[-1]
    return segments, None
