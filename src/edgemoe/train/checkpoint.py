"""Atomic, self-verifying checkpoints.

A checkpoint file is ``MAGIC | sha256(payload) | len(payload) | payload`` where the payload is a
``torch.save`` blob. It is written to a temporary file in the same folder, flushed and fsynced, then
renamed over the target, so a crash leaves either the previous checkpoint or the new one, never a
torn file. Loading re-checks length and digest and refuses anything else with :class:`CheckpointError`.
"""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path
from typing import Any

import torch

from edgemoe.files import atomic_write_bytes

MAGIC = b"EDGEMOE-CKPT-v1\n"
_HEADER = struct.Struct(">32sQ")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or corrupt; the message says which and what to do."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically; returns the path."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = _HEADER.pack(hashlib.sha256(payload).digest(), len(payload))
    return atomic_write_bytes(path, MAGIC + header + payload)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist; pass a file written by --checkpoint-every"
        )
    raw = path.read_bytes()
    fix = "delete it and resume from an earlier checkpoint, or start without --resume"
    if not raw.startswith(MAGIC):
        raise CheckpointError(f"checkpoint {str(path)!r} is not an edgemoe checkpoint (bad header); {fix}")
    head_end = len(MAGIC) + _HEADER.size
    if len(raw) < head_end:
        raise CheckpointError(f"checkpoint {str(path)!r} is partial (truncated header); {fix}")
    digest, length = _HEADER.unpack(raw[len(MAGIC) : head_end])
    payload = raw[head_end:]
    if len(payload) != length:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is partial: {len(payload)} of {length} payload bytes present; {fix}"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt (checksum mismatch); {fix}")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
