"""The byte-level tokenizer of the small configs, in Hugging Face ``tokenizers`` JSON format.

Every byte is a token (ids 0-255 in byte order), EMMA's special tokens follow; a real checkpoint
brings its own tokenizer.json with the same special tokens added.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from .config import SPECIAL_TOKENS


def byte_level_tokenizer(vocab_size: int) -> Tokenizer:
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer")
    return _byte_bpe(_byte_vocab(), [], add_prefix_space=False)


def _byte_vocab() -> dict[str, int]:
    # ByteLevel maps byte b to a printable character; order the vocabulary by byte value.
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(pre_tokenizers.ByteLevel.alphabet())
    return vocab


def _byte_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], add_prefix_space: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2 byte <-> printable-character table that ByteLevel uses.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def word_merging_tokenizer(words: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE whose merges make each of ``words`` one token (with its leading space).

    Any text still encodes (bytes are the fallback), but a caption of the shapes world is ~8 tokens
    instead of ~45 bytes: a 4-layer model then learns what the words mean instead of spending its
    capacity (and the training budget) on spelling them out. Every word is written with a leading
    space (``add_prefix_space``), so "red" is the same token at the start and inside a sentence.
    """
    byte_to_char = _bytes_to_unicode()
    vocab = _byte_vocab()
    merges: list[tuple[str, str]] = []
    space = byte_to_char[ord(" ")]
    for word in sorted(set(words)):
        chars = [byte_to_char[b] for b in (" " + word).encode("utf-8")]
        assert chars[0] == space
        piece = chars[0]
        for c in chars[1:]:
            merged = piece + c
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((piece, c))
            piece = merged
    if len(vocab) + len(SPECIAL_TOKENS) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small: {len(vocab)} tokens + {len(SPECIAL_TOKENS)} special")
    return _byte_bpe(vocab, merges, add_prefix_space=True)
