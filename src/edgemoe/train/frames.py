"""Length-prefixed pickles: the message format of the ``dist`` transport and of append-only trace
files. A frame is an 8-byte big-endian length followed by the pickle; a torn tail (a crash in the
middle of an append) is simply an incomplete frame and is ignored."""

from __future__ import annotations

import pickle
import struct
from typing import Any

LEN = struct.Struct(">Q")


def frame(obj: Any) -> bytes:
    """One frame: 8-byte big-endian length, then the pickle."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return LEN.pack(len(payload)) + payload


def read_frames(buf: bytearray) -> list[Any]:
    """Pop every complete frame off the front of ``buf`` (an incomplete one stays)."""
    out = []
    while len(buf) >= LEN.size:
        (size,) = LEN.unpack_from(buf)
        if len(buf) < LEN.size + size:
            break
        out.append(pickle.loads(bytes(buf[LEN.size : LEN.size + size])))
        del buf[: LEN.size + size]
    return out
