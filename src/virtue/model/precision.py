"""Precision settings that would otherwise be process-wide: the dtype modules are built in, and cuDNN's TF32.

* `built_in(dtype)` creates a model's tensors directly in `dtype` (no float32 copy of a 7B model) without
  `torch.set_default_dtype`, which would change every other thread's new tensors while it builds. It is a
  `TorchFunctionMode`, and mode stacks belong to the thread that enters them: floating-point tensors made by
  torch's factory functions without an explicit dtype come out in `dtype` in this thread only, as they would
  under the default dtype.
* `cudnn_tf32_off()` keeps cuDNN's TF32 convolutions off while any float32 CUDA `encode` runs (they move the
  official embeddings by ~3e-4). The flag is process-wide in PyTorch, so overlapping calls share one reference
  count: the first turns it off, the last restores what it was; no call runs with it on, and it never stays off.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors


class _BuiltIn(TorchFunctionMode):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (func in _device_constructors() and kwargs.get("dtype") is None and isinstance(out, torch.Tensor)
                and out.dtype == torch.get_default_dtype() and out.dtype != self.dtype):
            # What the default dtype would have given; made in the default first, so peak memory is one tensor.
            out = out.to(self.dtype)
        return out


@contextlib.contextmanager
def built_in(dtype: torch.dtype) -> Iterator[None]:
    """Tensors created in this thread by factory functions without a dtype come out in `dtype`."""
    if dtype == torch.get_default_dtype():
        yield
        return
    with _BuiltIn(dtype):
        yield


_tf32_lock = threading.Lock()
_tf32_users = 0
_tf32_before = True


@contextlib.contextmanager
def cudnn_tf32_off() -> Iterator[None]:
    global _tf32_users, _tf32_before
    with _tf32_lock:
        if _tf32_users == 0:
            _tf32_before = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = False
        _tf32_users += 1
    try:
        yield
    finally:
        with _tf32_lock:
            _tf32_users -= 1
            if _tf32_users == 0:
                torch.backends.cudnn.allow_tf32 = _tf32_before
