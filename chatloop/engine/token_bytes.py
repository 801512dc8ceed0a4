"""Each token's own bytes, as OpenAI's logprobs report them (``bytes``, and the text of a token).

A token may hold part of a UTF-8 character, so decoding it alone can give U+FFFD where its bytes do not: these are
read from the tokenizer's vocabulary (GPT-2's byte-level alphabet, or SentencePiece's ``<0xNN>`` byte tokens and
``▁`` spaces), not from ``decode``.
"""

from __future__ import annotations

import json
import re

__all__ = ["token_byte_table"]

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _gpt2_byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def _decoder_types(tokenizer) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return {decoder.get("type", "")} | {d.get("type", "") for d in decoder.get("decoders", [])}


def token_byte_table(tokenizer) -> list[bytes]:
    """The bytes of every token id of ``tokenizer`` (special tokens: their text)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_tokens)
    kinds = _decoder_types(tokenizer)
    byte_level = _gpt2_byte_decoder() if "ByteLevel" in kinds else None
    table = []
    for token_id, piece in enumerate(pieces):
        if piece is None:
            table.append(b"")
        elif piece in special:
            table.append(piece.encode())
        elif byte_level is not None and all(c in byte_level for c in piece):
            table.append(bytes(byte_level[c] for c in piece))
        elif match := _BYTE_TOKEN.match(piece):
            table.append(bytes([int(match.group(1), 16)]))
        elif "▁" in piece:
            table.append(piece.replace("▁", " ").encode())
        else:
            table.append(tokenizer.decode([token_id]).encode())
    return table
