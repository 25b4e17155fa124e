"""The UNet's named presets and its config checks: every constraint a config must meet, checked before any
layer is built, each failure a ValueError naming the setting (knows nothing but the config values)."""

from __future__ import annotations

import json
import math

# Named configurations. `seed` is the original project's exact model (6,069,156 parameters at
# in_channels=4); `tiny` is for tests and smoke runs; `small` is the main job's CPU-friendly model;
# `large` is a wider, deeper model for GPU training on 32x32-64x64 latents.
PRESETS: dict[str, dict] = {
    "tiny": dict(down_channels=(16, 32, 32), mid_channels=(32, 32), time_emb_dim=32,
                 down_sample=(True, False), num_heads=2, norm_num_groups=8, head_channels=8),
    "small": dict(down_channels=(32, 64, 128), mid_channels=(128, 64), time_emb_dim=128,
                  down_sample=(True, True), num_heads=4, attention_levels=(1, 2)),
    "seed": dict(down_channels=(32, 64, 128, 256), mid_channels=(256, 256, 128), time_emb_dim=128,
                 down_sample=(True, True, False)),
    "large": dict(down_channels=(128, 256, 384, 512), mid_channels=(512, 512, 384), time_emb_dim=512,
                  down_sample=(True, True, True), num_down_layers=2, num_mid_layers=1,
                  num_up_layers=2, attention_levels=(1, 2, 3), norm_num_groups=32, head_channels=64),
}


def downsample_factor(down_sample) -> int:
    """2 to the number of down-sampling steps: a model with these `down_sample` flags takes H and W divisible
    by it."""
    return 2 ** sum(bool(d) for d in down_sample)


def size_advice(down_sample, height: int, width: int, origin: str) -> str:
    """How to train on H x W latents that `down_sample` (from `origin`, e.g. "--preset large") halves too often: the
    flags with the deepest down-sampling steps turned off until 2 ** steps divides H and W, as a --model_config."""
    fit = [bool(d) for d in down_sample]
    for i in reversed(range(len(fit))):
        if height % downsample_factor(fit) == 0 and width % downsample_factor(fit) == 0:
            break
        fit[i] = False
    steps = sum(bool(d) for d in down_sample)
    flag = f"--model_config '{{\"down_sample\": {json.dumps(fit)}}}'"
    return (f"crop/pad the latents to a multiple of {2 ** steps}, or down-sample fewer times ({origin} halves them "
            f"{steps} time{'s' * (steps != 1)}): {flag} (with any other keys of your --model_config)")


def check_types(**config) -> None:
    """Raise a ValueError naming the first setting of the wrong type. A JSON config can hold 2.0 for 2 or
    "false" for false: built as given, a float width fails only at the first forward, and a string flag is
    true."""
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def ints(v) -> bool:
        return isinstance(v, (list, tuple)) and all(is_int(x) for x in v)

    expected = {"a list of integers": ("down_channels", "mid_channels"),
                "a list of true/false flags": ("down_sample",),
                "an integer": ("in_channels", "time_emb_dim", "num_down_layers", "num_mid_layers", "num_up_layers",
                               "num_heads", "norm_num_groups", "head_channels")}
    checks = {"a list of integers": ints, "an integer": is_int,
              "a list of true/false flags": lambda v: isinstance(v, (list, tuple)) and all(
                  isinstance(x, bool) for x in v)}
    problems = [(name, what) for what, names in expected.items() for name in names if not checks[what](config[name])]
    if config["attention_levels"] is not None and not ints(config["attention_levels"]):
        problems.append(("attention_levels", "a list of integers or null"))
    if config["num_class_embeds"] is not None and not is_int(config["num_class_embeds"]):
        problems.append(("num_class_embeds", "an integer or null"))
    if isinstance(config["dropout"], bool) or not isinstance(config["dropout"], (int, float)):
        problems.append(("dropout", "a number"))
    if not (is_int(config["sample_size"]) or ints(config["sample_size"])):
        problems.append(("sample_size", "an integer or a list of two"))
    if problems:
        name, what = problems[0]
        value = config[name]
        hint = (f" (a numpy {type(value).__name__}: pass a Python number, e.g. int(...), as the config is saved as "
                "JSON)" if type(value).__module__ == "numpy" else "")
        raise ValueError(f"invalid AdvancedUNet2DModel config: {name} must be {what}, got {value!r}{hint}")


def validate_config(**config) -> None:
    """Raise a ValueError naming the first setting of the wrong type (`check_types`), else the first constraint
    the configuration breaks; `config` holds every `AdvancedUNet2DModel.__init__` argument."""
    check_types(**config)
    c = config  # short names for the checks below
    down, mid, down_sample = list(c["down_channels"]), list(c["mid_channels"]), c["down_sample"]
    in_channels, temb, heads, groups = c["in_channels"], c["time_emb_dim"], c["num_heads"], c["norm_num_groups"]
    attention_levels, num_classes, dropout = c["attention_levels"], c["num_class_embeds"], c["dropout"]
    head_channels, sample_size = c["head_channels"], c["sample_size"]
    layers = (c["num_down_layers"], c["num_mid_layers"], c["num_up_layers"])

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"invalid AdvancedUNet2DModel config: {msg}")

    need(in_channels >= 1, f"in_channels must be >= 1, got {in_channels}")
    need(len(down) >= 2, f"down_channels needs at least 2 entries, got {down}")
    need(len(mid) >= 2, f"mid_channels needs at least 2 entries, got {mid}")
    need(mid[0] == down[-1], f"mid_channels[0] ({mid[0]}) must equal down_channels[-1] ({down[-1]})")
    need(mid[-1] == down[-2], f"mid_channels[-1] ({mid[-1]}) must equal down_channels[-2] ({down[-2]})")
    need(len(down_sample) == len(down) - 1,
         f"down_sample needs len(down_channels) - 1 = {len(down) - 1} flags, got {len(down_sample)}")
    need(temb > 0 and temb % 2 == 0, f"time_emb_dim must be a positive even number, got {temb}")
    need(all(n >= 1 for n in layers), f"num_down/mid/up_layers must be >= 1, got {layers}")
    need(heads >= 1, f"num_heads must be >= 1, got {heads}")
    need(groups >= 1, f"norm_num_groups must be >= 1, got {groups}")
    for width in [*down, *mid, head_channels]:
        need(width > 0 and width % groups == 0,
             f"every channel width must be divisible by norm_num_groups={groups}; {width} is not")
    n_levels = len(down) - 1
    if attention_levels is not None:
        bad = [lvl for lvl in attention_levels if not 0 <= lvl <= n_levels]
        need(not bad, f"attention_levels {bad} out of range; valid levels are 0..{n_levels}")
        attn_widths = [down[i + 1] for i in attention_levels if i < n_levels]
        attn_widths += [down[i - 1] if i else head_channels for i in attention_levels if i < n_levels]
        attn_widths += mid[1:] if n_levels in attention_levels else []
    else:
        attn_widths = down[1:] + mid[1:] + down[:-2] + [head_channels]
    for width in attn_widths:
        need(width % heads == 0, f"attention width {width} is not divisible by num_heads={heads}")
    need(num_classes is None or num_classes >= 1, f"num_class_embeds must be >= 1 or None, got {num_classes}")
    need(0.0 <= dropout < 1.0, f"dropout must be in [0, 1), got {dropout}")
    need(math.isfinite(dropout), "dropout must be finite")
    sizes = [sample_size] * 2 if isinstance(sample_size, int) else list(sample_size)
    factor = downsample_factor(down_sample)
    need(len(sizes) == 2 and all(n >= 1 and n % factor == 0 for n in sizes),  # integers (check_types)
         f"sample_size must be H or (H, W), positive and divisible by {factor} (2 per down_sample step), "
         f"got {sample_size}")
