"""Mixed precision for tinymeg's ops: under ``torch.autocast`` each op does what autocast does to
the aten ops it replaces.

Autocast sorts aten ops into lists (aten/src/ATen/autocast_mode.cpp): matmul-class ops (mm,
addmm, linear, bmm, SDPA) run in the autocast dtype (bf16 or fp16); norms, softmax and losses
run in float32 (on CUDA layer_norm is on that list, on the CPU it is not); every other op runs in
its inputs' dtypes. A custom op is on no list, so by default its kernel runs with autocast still
on and the aten ops inside it autocast one by one (a bf16 logits chunk then met float32 hidden
states in linear_cross_entropy's gradient matmul: a crash). So every op registers an autocast
kernel with a policy per device:

- ``LOWER``: floating inputs cast to the autocast dtype of the moment (a matmul: the loss's
  head, grouped_mm, ring attention; bias_gelu too, since it is the bias add of a matmul);
- ``FP32``: floating inputs cast to float32 (CUDA's layer_norm);
- ``KEEP``: inputs as they are (CPU's layer_norm, every backward op);

then runs the op with autocast off, as ``torch.library.register_autocast`` does (which casts to
one dtype fixed when it is registered: LOWER must follow the autocast region's dtype). Inside,
each op computes as it does outside autocast in those dtypes: matmuls in the inputs' dtype,
softmax and loss statistics in float32. The ops' wrappers (``tinymeg.ops.layer_norm``, ...) cast
their arguments by the same policy before they choose the plain path or the op, so that both
paths (and the autotuner, which compares them) see the dtypes the math runs in.
"""
from __future__ import annotations

import contextlib

import torch

LOWER, FP32, KEEP = "lower", "fp32", "keep"
DEVICES = ("cpu", "cuda")
# A backward op takes what its forward saved, in the dtypes it chose: cast nothing. (Also the
# policy of an op whose aten counterpart is on no autocast list: rms_norm, swiglu.)
BACKWARD = {"cpu": KEEP, "cuda": KEEP}

_lib = torch.library.Library("tinymeg", "IMPL")  # kept alive: its registrations live as long as it


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype matmuls autocast to on this device type now, or None outside autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def cast(policy: str, device_type: str, args: tuple) -> tuple:
    """args with their floating tensors on device_type (float64 left alone, as aten does) cast
    as the policy says, for the autocast state of the moment."""
    dtype = {LOWER: autocast_dtype(device_type), FP32: torch.float32, KEEP: None}[policy]
    if dtype is None:
        return args
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64
                 and a.device.type == device_type else a for a in args)


def lower(*tensors: torch.Tensor) -> tuple:
    """tensors as a matmul under the current autocast takes them (unchanged outside autocast)."""
    return cast(LOWER, tensors[0].device.type, tensors)


def cast_for(policies: dict, args: tuple) -> tuple:
    """args cast as an op with these policies (device type -> policy) casts them under the
    current autocast, on the device of its first tensor argument."""
    device_type = next(a for a in args if isinstance(a, torch.Tensor)).device.type
    return cast(policies.get(device_type, KEEP), device_type, args)


def autocast_off(device_type: str):
    """A region where aten ops do not autocast (code that chose its dtypes itself)."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def register_autocast(op, policies: dict) -> None:
    """Autocast kernels for op (made by torch.library.custom_op): ``policies`` maps each device
    type ("cpu", "cuda") to LOWER, FP32 or KEEP."""
    for device_type in DEVICES:
        policy = policies[device_type]
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_dispatch_keys, *args, policy=policy, device_type=device_type, keyset=keyset):
            args = cast(policy, device_type, args)
            with torch._C._ExcludeDispatchKeyGuard(keyset):
                return op._opoverload(*args)
        _lib.impl(op._name, kernel, key, with_keyset=True)
