"""Checks of `LatentDDPMPipeline.__call__`'s arguments and of what its step-end callback returns.

The hub copy of pipeline.py (`latent_ddpm.remote.code`) pastes this module in whole: it must import nothing
from the package.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch


def check_call(batch_size, num_inference_steps, generator, class_labels, guidance_scale, eta, latents,
               channels: int, factor: int = 1) -> None:
    """`LatentDDPMPipeline.__call__`'s arguments, checked up front: a ValueError/TypeError naming the argument
    (left to torch and diffusers, -1 steps returned the starting noise undenoised, float labels were
    truncated, and the rest failed deep inside with messages that do not name the argument)."""
    def is_int(v) -> bool:  # numpy's integers too (a sweep over np.arange), never a bool
        return isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_)

    def is_number(v) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_)

    if latents is None and not (is_int(batch_size) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if num_inference_steps is not None and not (is_int(num_inference_steps) and num_inference_steps >= 1):
        raise ValueError(f"num_inference_steps must be an int >= 1 (or None for the default), got "
                         f"{num_inference_steps!r}")
    gens = generator if isinstance(generator, list) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in gens):
        raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
    if class_labels is not None:
        try:
            labels = torch.as_tensor(class_labels)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"class_labels must be integer class ids, got {class_labels!r} ({err})") from None
        if labels.numel() == 0:  # torch reads [] as float32: it was "got torch.float32 values"
            raise ValueError("class_labels is empty; give one integer class id per sample")
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"class_labels must be integer class ids, got {labels.dtype} values")
    if not is_number(guidance_scale) or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    if guidance_scale != 1.0 and class_labels is None:
        raise ValueError("guidance_scale needs class_labels (guidance steers each sample towards its class); "
                         "leave it at 1.0 for unconditional sampling")
    if not is_number(eta) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a number in [0, 1] (0: deterministic DDIM), got {eta!r}")
    if latents is not None and not (isinstance(latents, torch.Tensor) and latents.ndim == 4
                                    and latents.shape[1] == channels and latents.shape[0] >= 1
                                    and latents.shape[2] % factor == 0 and latents.shape[3] % factor == 0):
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a torch.Tensor of shape (B, {channels}, H, W), H and W divisible by "
                         f"{factor} (the UNet's downsampling), got {shape}")


def check_callback(callback, tensor_inputs, valid: list[str]) -> None:
    """`callback_on_step_end` and `callback_on_step_end_tensor_inputs`, as diffusers' `check_inputs` checks them
    (names among the pipeline's `_callback_tensor_inputs`), with the valid names in the message."""
    if callback is not None and not callable(callback):
        raise TypeError(f"callback_on_step_end must be callable, fn(pipe, step_index, timestep, callback_kwargs) -> "
                        f"dict, got {type(callback).__name__}")
    if not isinstance(tensor_inputs, list | tuple) or not all(k in valid for k in tensor_inputs):
        raise ValueError(f"callback_on_step_end_tensor_inputs must be a list of names among {valid} (the tensors "
                         f"this pipeline can pass to the callback), got {tensor_inputs!r}")


def step_end_latents(outputs, latents: torch.Tensor) -> torch.Tensor:
    """The loop's latents after a step-end callback returned `outputs`: its "latents" if it has them (diffusers'
    convention), which must be a tensor of the loop's shape (taken in the loop's dtype and device), else `latents`."""
    if not isinstance(outputs, dict):
        raise TypeError(f"callback_on_step_end must return a dict (its callback_kwargs, changed or not), got "
                        f"{type(outputs).__name__}")
    new = outputs.pop("latents", latents)
    if not isinstance(new, torch.Tensor):
        raise ValueError(f"callback_on_step_end returned latents as {type(new).__name__}; they must be a torch "
                         f"tensor of the loop's shape {tuple(latents.shape)}")
    if new.shape != latents.shape:
        raise ValueError(f"callback_on_step_end returned latents of shape {tuple(new.shape)}; they must keep the "
                         f"loop's shape {tuple(latents.shape)}")
    return new.to(device=latents.device, dtype=latents.dtype)  # a half or double copy would change the output
