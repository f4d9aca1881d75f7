"""Atomic, self-verifying checkpoints.

A checkpoint file is ``MAGIC | sha256(payload) | len(payload) | payload`` where the payload is a
``torch.save`` blob. It is written to a temporary file in the same folder, flushed and fsynced, then
renamed over the target, so a crash leaves either the previous checkpoint or the new one, never a
torn file; temporary files left by a process killed mid-save are removed by :func:`clean_stale_temps`.
Loading re-checks length, digest, format and configuration and refuses anything else with a one-line
:class:`CheckpointError` naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from edgemoe.errors import EdgeMoEError
from edgemoe.files import atomic_write_bytes
from edgemoe.train.frames import frame, read_frames

MAGIC = b"EDGEMOE-CKPT-v1\n"
_HEADER = struct.Struct(">32sQ")


FORMAT = 1


class CheckpointError(EdgeMoEError):
    """A checkpoint is missing, partial, corrupt or from another run; the message says what to do."""


def clean_stale_temps(folder: str | Path) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>`` files whose writer process is gone; returns what was removed."""
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}); {fix}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {found!r}, this version reads format {FORMAT}; "
            "resume it with the version that wrote it, or start without --resume"
        )
    state["path"] = str(path)
    return state


def check_resumable(config: dict[str, Any], state: dict[str, Any], may_change: Iterable[str]) -> None:
    """Refuse a checkpoint written with a different configuration (fields in ``may_change`` excepted)."""
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint format {state.get('format')!r} not understood (expected {FORMAT})")
    theirs = state["config"]
    allowed = set(may_change)
    diff = sorted(k for k in set(config) | set(theirs) if k not in allowed and config.get(k) != theirs.get(k))
    if diff:
        where = state.get("path", "the checkpoint")
        raise CheckpointError(
            f"checkpoint {where!r} was written with a different configuration (fields {diff}); "
            "resume with the same config or start a new run"
        )


class TraceLog:
    """The append-only companion of a checkpoint: ``<checkpoint>.trace`` next to it.

    Per-slot lists (metric rows, evaluations, recorded gate scores) grow with the run, so they stay
    out of the checkpoint, which therefore has a constant size: each :meth:`save` appends only what
    is new since the last one (one fsynced frame); the checkpoint records how many items of each list
    it covers. :meth:`load` reads them back, cut to the checkpoint's counts (items appended by a
    save that crashed before its checkpoint was renamed are dropped).
    """

    def __init__(self, keys: tuple[str, ...]):
        self.keys = keys
        self.path: Path | None = None
        self.counts = dict.fromkeys(keys, 0)

    @staticmethod
    def path_for(checkpoint: str | Path) -> Path:
        return Path(checkpoint).with_suffix(".trace")

    def save(self, checkpoint: str | Path, lists: dict[str, list[Any]]) -> dict[str, int]:
        """Append the new items of ``lists`` (or write them all to a new file); returns the counts."""
        path = self.path_for(checkpoint)
        if path != self.path:
            atomic_write_bytes(path, frame({k: list(lists[k]) for k in self.keys}))
        else:
            with path.open("ab") as fh:
                fh.write(frame({k: list(lists[k][self.counts[k] :]) for k in self.keys}))
                fh.flush()
                os.fsync(fh.fileno())
        self.path, self.counts = path, {k: len(lists[k]) for k in self.keys}
        return dict(self.counts)

    def load(self, checkpoint: str | Path, counts: dict[str, int]) -> dict[str, list[Any]]:
        """The lists as of the checkpoint; a missing or short trace file is a :class:`CheckpointError`."""
        path = self.path_for(checkpoint)
        lists: dict[str, list[Any]] = {k: [] for k in self.keys}
        if path.is_file():
            for record in read_frames(bytearray(path.read_bytes())):
                for k in self.keys:
                    lists[k].extend(record[k])
        short = [k for k in self.keys if len(lists[k]) < counts[k]]
        if short:
            raise CheckpointError(
                f"trace file {str(path)!r} next to checkpoint {str(checkpoint)!r} is missing or short "
                f"({', '.join(short)}); keep the two files together, or start without --resume"
            )
        lists = {k: lists[k][: counts[k]] for k in self.keys}
        atomic_write_bytes(path, frame(lists))
        self.path, self.counts = path, dict(counts)
        return lists
