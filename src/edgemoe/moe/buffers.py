"""Storage that the ``sorted`` executor reuses across steps instead of allocating it fresh.

A fresh multi-megabyte CPU tensor costs a page fault per 4 KiB on first touch, and whether freed
memory comes back without faults depends on the allocator (glibc returns blocks above its mmap
threshold to the kernel on free). Holding the storage ourselves makes the cost independent of it.

- :class:`SortedBuffers`: the row buffers (gathered inputs, hidden activations, outputs) of
  finished steps, handed to the next forward.
- :class:`GradBuffers`: one weight-gradient tensor per expert parameter, reused while nothing
  outside holds it (see its docstring for how it meets ``torch.optim`` and ``zero_grad``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _storage_refs(t: Tensor) -> int:
    """References to ``t``'s storage (tensors and views of it, anywhere in the process)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


# What _storage_refs reports for a storage held by exactly one tensor.
_SOLE_OWNER = _storage_refs(torch.empty(1))


class SortedBuffers:
    """Flat row buffers of finished steps, reused by the next forward of the same experts.

    Buffers are over-allocated by 12.5 % so a slightly larger next step still fits; at most
    ``max_buffers`` are kept.
    """

    def __init__(self, max_buffers: int = 12):
        self.max_buffers = max_buffers
        self._free: list[Tensor] = []

    def take(self, rows: int, cols: int, like: Tensor) -> Tensor:
        """A contiguous ``[rows, cols]`` tensor (uninitialised)."""
        numel = rows * cols
        fits = [
            i
            for i, b in enumerate(self._free)
            if b.numel() >= numel and b.dtype == like.dtype and b.device == like.device
        ]
        if fits:
            buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        else:
            buf = like.new_empty(numel + numel // 8)
        return buf[:numel].view(rows, cols)

    def give(self, *tensors: Tensor | None) -> None:
        """Return buffers obtained from :meth:`take` once nothing uses them any more.

        Buffers made under ``torch.inference_mode`` are dropped: they cannot be written outside it.
        """
        for t in tensors:
            if t is not None and not t.is_inference():
                self._free.append(t._base if t._base is not None else t)
        self._free.sort(key=Tensor.numel, reverse=True)
        del self._free[self.max_buffers :]


class GradBuffers:
    """Weight-gradient storage reused across steps while nobody else references it.

    :meth:`take` returns a fresh tensor object over a cached storage when that storage is
    referenced by the cache alone. The backward returns it as the parameter's gradient; autograd
    adopts a returned gradient as ``param.grad`` without copying when ``.grad`` is ``None``.
    ``optimizer.zero_grad()`` (``set_to_none=True``) then drops the only outside reference, so the
    next step writes into the same memory. If the storage is still referenced (``.grad`` kept for
    accumulation, a hook or a user holding it), a new storage is allocated and cached instead:
    memory someone can observe is never overwritten. Costs one parameter-sized tensor per expert
    weight held between steps.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def take(self, key: str, like: Tensor) -> Tensor:
        """An uninitialised contiguous tensor shaped like ``like`` that nothing else references."""
        buf = self._bufs.get(key)
        reusable = (
            buf is not None
            and buf.shape == like.shape
            and buf.dtype == like.dtype
            and buf.device == like.device
            and _storage_refs(buf) <= _SOLE_OWNER
        )
        if not reusable:
            buf = torch.empty(like.shape, dtype=like.dtype, device=like.device)
            self._bufs[key] = buf
        assert buf is not None  # reused only when there was one
        return buf.view(buf.shape)
