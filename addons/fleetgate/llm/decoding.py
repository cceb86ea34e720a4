"""Incremental Content-Encoding decoding for a response that streams past us.

The agent receives the bytes unchanged; our copy is decoded chunk by chunk so that the
usage parser sees text, without ever holding the whole body.
"""

from __future__ import annotations

import zlib
from typing import Any

__all__ = ["StreamDecoder"]


class StreamDecoder:
    """``feed(bytes) -> bytes`` for identity, gzip, deflate, br and zstd."""

    def __init__(self, content_encoding: str) -> None:
        self.encodings = [e.strip().lower() for e in content_encoding.split(",")
                          if e.strip() and e.strip().lower() != "identity"]
        if len(self.encodings) > 1:
            raise ValueError(f"stacked Content-Encoding {content_encoding!r} is not supported")
        self._dec: Any = None
        self._deflate = False
        self._head = b""
        enc = self.encodings[0] if self.encodings else ""
        if enc in ("gzip", "x-gzip"):
            self._dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":
            self._deflate = True  # zlib-wrapped or raw: decided on the first two bytes
        elif enc == "br":
            import brotli

            self._dec = brotli.Decompressor()
        elif enc == "zstd":
            import zstandard

            self._dec = zstandard.ZstdDecompressor().decompressobj()
        elif enc:
            raise ValueError(f"unsupported Content-Encoding {content_encoding!r}")

    def feed(self, data: bytes) -> bytes:
        if self._deflate and self._dec is None:
            self._head += data
            if len(self._head) < 2:
                return b""
            h = self._head
            wrapped = (h[0] & 0x0F) == 8 and ((h[0] << 8) | h[1]) % 31 == 0
            self._dec = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
            data, self._head = h, b""
        if self._dec is None or not data:
            return data
        if hasattr(self._dec, "process"):  # brotli
            return bytes(self._dec.process(data))
        return bytes(self._dec.decompress(data))
