"""AdvancedUNet2DModel: config axes, validation, timesteps, conditioning, precision, checkpointing, saving."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from latent_ddpm import PRESETS, AdvancedUNet2DModel
from latent_ddpm.unet import SelfAttention
from latent_ddpm.unet_config import downsample_factor, size_advice

# sha256 of the original's state-dict listing ("key\t(shape)" lines of original_unet_state_dict.tsv),
# so the check runs even where the shared seed folder is absent.
ORIGINAL_TSV_SHA256 = "9ade2403606e50df92734a18976f213f09f646afa384f0a95e1df54c0cc5c7e6"
ROOT = Path(__file__).resolve().parents[1]
TSV_CANDIDATES = [ROOT / "shared/seed/original_unet_state_dict.tsv",
                  ROOT.parent / "shared/seed/original_unet_state_dict.tsv"]


def _x(b=2, c=2, h=8, w=8, seed=1):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the original, exactly


def test_seed_preset_parameter_count():
    model = AdvancedUNet2DModel.from_preset("seed", in_channels=4)
    assert sum(p.numel() for p in model.parameters()) == 6_069_156


def test_original_reference_matches_state_dict_listing(original_unet):
    model = original_unet.Unet(original_unet.ORIGINAL_CONFIG)
    lines = [f"{k}\t{tuple(v.shape)}" for k, v in model.state_dict().items()]
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == ORIGINAL_TSV_SHA256
    assert sum(p.numel() for p in model.parameters()) == 6_069_156
    tsv = next((p for p in TSV_CANDIDATES if p.is_file()), None)
    if tsv is not None:  # a readable diff where the listing is at hand
        rows = [r for r in Path(tsv).read_text().splitlines() if r and not r.startswith("#")]
        assert lines == rows


# ---------------------------------------------------------------- shapes for every config axis

AXES = {
    "default": {},
    "in_channels_1": dict(in_channels=1),
    "in_channels_5": dict(in_channels=5),
    "no_downsample": dict(down_sample=(False, False)),
    "all_downsample": dict(down_sample=(True, True)),
    "three_levels": dict(down_channels=(8, 8, 16, 16), mid_channels=(16, 16), down_sample=(True, False, True)),
    "mid_three": dict(mid_channels=(16, 24, 16)),
    "layers": dict(num_down_layers=2, num_mid_layers=2, num_up_layers=3),
    "attn_none": dict(attention_levels=()),
    "attn_mid_only": dict(attention_levels=(2,)),
    "attn_level0": dict(attention_levels=(0,)),
    "classes": dict(num_class_embeds=3),
    "dropout": dict(dropout=0.1),
    "head_channels": dict(head_channels=4),
    "heads_1": dict(num_heads=1),
    "non_square": dict(sample_size=(8, 16)),
}


@pytest.mark.parametrize("overrides", AXES.values(), ids=AXES.keys())
def test_forward_shape_and_dtype(make_unet, overrides):
    model = make_unet(**overrides)
    size = model.config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    x = _x(c=model.config.in_channels, h=h, w=w)
    out = model(x, torch.tensor([1, 7])).sample
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_attention_levels_choose_where_attention_runs(make_unet):
    def where(model):
        return [[isinstance(a, SelfAttention) for a in blk.attentions]
                for blk in [*model.down_blocks, *model.mid_blocks, *model.up_blocks]]

    # blocks: down0, down1, mid0, up(level 1), up(level 0)
    assert where(make_unet()) == [[True]] * 5
    assert where(make_unet(attention_levels=(0,))) == [[True], [False], [False], [False], [True]]
    assert where(make_unet(attention_levels=(2,))) == [[False], [False], [True], [False], [False]]


def test_downsample_factor_and_layer_counts(make_unet):
    assert make_unet().downsample_factor == 2
    assert make_unet(down_sample=(True, True)).downsample_factor == 4
    m = make_unet(num_down_layers=2, num_mid_layers=3, num_up_layers=1)
    assert [len(b.resnets) for b in m.down_blocks] == [2, 2]
    assert [len(b.resnets) for b in m.mid_blocks] == [4] and [len(b.attentions) for b in m.mid_blocks] == [3]
    assert [len(b.resnets) for b in m.up_blocks] == [1, 1]


@pytest.mark.parametrize("preset, size, advised", [
    ("large", (28, 28), [True, True, False]), ("small", (6, 6), [True, False]),
    ("seed", (12, 18), [True, False, False]), ("tiny", (1, 64), [False, False]),
    ("seed", (7, 7), [False, False, False])])
def test_size_advice_gives_a_model_config_that_fits(preset, size, advised):
    # latents the preset halves too often (a DC-AE 28x28, an audio 1x64): the error advises the deepest steps off
    down_sample = PRESETS[preset]["down_sample"]
    factor = downsample_factor(down_sample)
    assert size[0] % factor or size[1] % factor
    advice = size_advice(down_sample, *size, f"--preset {preset}")
    assert advice.endswith(f"""--model_config '{{"down_sample": {str(advised).lower()}}}' (with any other keys of """
                           "your --model_config)")
    assert f"a multiple of {factor}" in advice and f"--preset {preset} halves them" in advice
    assert size[0] % downsample_factor(advised) == 0 and size[1] % downsample_factor(advised) == 0


def test_presets_build():
    for name in PRESETS:
        AdvancedUNet2DModel.from_preset(name, in_channels=3)
    with pytest.raises(ValueError, match="unknown preset"):
        AdvancedUNet2DModel.from_preset("nope")
    with pytest.raises(ValueError, match="unknown preset"):  # TypeError: unhashable type: 'list'
        AdvancedUNet2DModel.from_preset(["tiny"])


# ---------------------------------------------------------------- invalid configs

INVALID = [
    (dict(in_channels=0), "in_channels"),
    (dict(down_channels="abc"), "down_channels must be a list of integers"),  # a string was read char by char
    # Wrong types from a JSON --model_config: num_heads 2.0 built and failed only at the first forward (after
    # --overwrite_output_dir had cleared the old run); "false" flags were true; others gave torch's own errors.
    (dict(num_heads=2.0), "num_heads must be an integer, got 2.0"),
    (dict(norm_num_groups=8.0), "norm_num_groups must be an integer"),
    (dict(in_channels="4"), "in_channels must be an integer"),
    # y.max() + 1 is a numpy int: refused (the config is JSON), with how to pass it
    (dict(num_class_embeds=np.int64(10)), r"np.int64\(10\) \(a numpy int64: pass a Python number, e.g. int"),
    (dict(down_channels=16), "down_channels must be a list of integers"),
    (dict(down_sample=("false", "false", "false")), "down_sample must be a list of true/false flags"),
    (dict(attention_levels=1), "attention_levels must be a list of integers or null"),
    (dict(attention_levels=(True,)), "attention_levels must be a list of integers or null"),
    (dict(num_class_embeds=True), "num_class_embeds must be an integer or null"),
    (dict(dropout="0.1"), "dropout must be a number"),
    (dict(sample_size=8.0), "sample_size must be an integer or a list of two"),
    (dict(down_channels=(8,), mid_channels=(8, 8), down_sample=()), "down_channels needs at least 2"),
    (dict(mid_channels=(16,)), "mid_channels needs at least 2"),
    (dict(mid_channels=(8, 16)), r"mid_channels\[0\]"),
    (dict(mid_channels=(16, 8)), r"mid_channels\[-1\]"),
    (dict(down_sample=(True,)), "down_sample needs"),
    (dict(time_emb_dim=15), "time_emb_dim"),
    (dict(num_mid_layers=0), "num_down/mid/up_layers"),
    (dict(num_heads=0), "num_heads must be >= 1"),
    (dict(norm_num_groups=3), "divisible by norm_num_groups"),
    (dict(head_channels=6), "divisible by norm_num_groups"),
    (dict(num_heads=3, norm_num_groups=1), "not divisible by num_heads"),
    (dict(attention_levels=(3,)), "attention_levels"),
    (dict(num_class_embeds=0), "num_class_embeds"),
    (dict(dropout=1.0), "dropout"),
    # Checked here, not first in the forward: a converted model saved with --sample_size 7 failed only in sample.py.
    (dict(sample_size=7), "sample_size must be"),
    (dict(sample_size=0), "sample_size must be"),
    (dict(sample_size=(8, -8)), "sample_size must be"),
]


@pytest.mark.parametrize("overrides, message", INVALID, ids=[m for _, m in INVALID])
def test_invalid_config_names_the_constraint(make_unet, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_unet(**overrides)


# ---------------------------------------------------------------- timesteps and conditioning


def test_timestep_forms_agree(make_unet):
    model, x = make_unet(), _x()
    with torch.no_grad():
        ref = model(x, torch.tensor([5, 5])).sample
        assert torch.allclose(model(x, 5).sample, ref, atol=1e-6)
        assert torch.allclose(model(x, 5.0).sample, ref, atol=1e-6)
        assert torch.allclose(model(x, torch.tensor(5)).sample, ref, atol=1e-6)
        per_sample = model(x, torch.tensor([5, 9])).sample
    assert torch.allclose(per_sample[0], ref[0], atol=1e-6)
    assert not torch.allclose(per_sample[1], ref[1], atol=1e-4)  # the timestep matters


@pytest.mark.parametrize("bad", [torch.tensor([1, 2, 3]), torch.zeros(2, 1), torch.tensor([1])])
def test_wrong_timestep_shape_raises(make_unet, bad):
    with pytest.raises(ValueError, match="timestep must be"):
        make_unet()(_x(), bad)


@pytest.mark.parametrize("shape", [(1, 2, 9, 8), (1, 2, 8, 6), (2, 8, 8), (1, 3, 8, 8)])  # C: conv_in's error
def test_bad_sample_shape_raises(make_unet, shape):
    model = make_unet(down_sample=(True, True))  # H and W must be divisible by 4
    with pytest.raises(ValueError, match=r"sample must be \(B, 2, H, W\) with H and W divisible by 4"):
        model(torch.randn(shape), 1)


def test_class_labels_condition_the_output(make_unet):
    model, x, t = make_unet(num_class_embeds=3), _x(), torch.tensor([3, 3])
    with torch.no_grad():
        torch.nn.init.normal_(model.class_embedding.weight)  # distinct classes
        a = model(x, t, class_labels=torch.tensor([0, 0])).sample
        b = model(x, t, class_labels=torch.tensor([1, 2])).sample
        null = model(x, t, class_labels=torch.tensor([3, 3])).sample
        none = model(x, t).sample
    assert not torch.allclose(a, b, atol=1e-4)
    assert torch.equal(none, null)  # no labels = the learned "no class" embedding
    assert model.null_class_label == 3
    with pytest.raises(ValueError, match="unconditional"):
        make_unet()(x, t, class_labels=torch.tensor([0, 0]))
    # A wrong length broadcast or failed in an add, floats were truncated, a list had no .to()
    for bad in (torch.tensor([0, 1, 2]), torch.tensor([0.7, 1.2]), torch.tensor([True, False])):
        with pytest.raises(ValueError, match=r"class_labels must be \(2,\) integer ids in 0..3"):
            model(x, t, class_labels=bad)
    assert torch.equal(model(x, t, class_labels=[0, 0]).sample, a)


# ---------------------------------------------------------------- precision, memory format, checkpointing


def test_bf16_autocast_forward_on_cpu(make_unet):
    model, x = make_unet(), _x()
    with torch.no_grad():
        ref = model(x, torch.tensor([1, 2])).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, torch.tensor([1, 2])).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.allclose(out.float(), ref, atol=0.1, rtol=0.1)


def test_bf16_weights_keep_dtype(make_unet):
    model = make_unet().to(torch.bfloat16)
    out = model(_x().to(torch.bfloat16), 3).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_channels_last_input_gives_same_result(make_unet):
    model, x = make_unet(), _x()
    with torch.no_grad():
        ref = model(x, 4).sample
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), 4).sample
    assert torch.allclose(out, ref, atol=1e-5)


def _loss_and_grads(model, x, t):
    model.zero_grad()
    loss = model(x, t).sample.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_same_loss_and_grads(make_unet):
    model, x, t = make_unet(num_down_layers=2).train(), _x(), torch.tensor([2, 8])
    loss, grads = _loss_and_grads(model, x, t)
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    calls = []
    inner = model._gradient_checkpointing_func
    model._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or inner(*a, **k)
    loss_ckpt, grads_ckpt = _loss_and_grads(model, x, t)
    assert calls, "gradient checkpointing was enabled but never used"
    assert torch.allclose(loss, loss_ckpt, atol=1e-6)
    for name, g in grads.items():
        assert torch.allclose(g, grads_ckpt[name], atol=1e-6), name


# ---------------------------------------------------------------- determinism and saving


def test_same_seed_same_model_and_output(make_unet):
    a, b, x = make_unet(seed=3), make_unet(seed=3), _x()
    with torch.no_grad():
        assert torch.equal(a(x, 5).sample, b(x, 5).sample)
        assert torch.equal(a(x, 5).sample, a(x, 5).sample)
        assert not torch.equal(a(x, 5).sample, make_unet(seed=4)(x, 5).sample)


def test_dropout_only_in_train_mode(make_unet):
    model, x = make_unet(dropout=0.5), _x()
    with torch.no_grad():
        assert torch.equal(model(x, 5).sample, model(x, 5).sample)
        model.train()
        assert not torch.equal(model(x, 5).sample, model(x, 5).sample)


@pytest.mark.parametrize("overrides", [{}, dict(num_class_embeds=2, sample_size=(8, 16), attention_levels=(1,))])
def test_save_pretrained_round_trip(make_unet, tmp_path, overrides):
    model = make_unet(**overrides)
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert "diffusion_pytorch_model.safetensors" in files and "config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pkl", ".pt", ".pth"))]
    loaded = AdvancedUNet2DModel.from_pretrained(tmp_path)
    for key in ("sample_size", "attention_levels", "num_class_embeds", "down_sample"):
        a, b = model.config[key], loaded.config[key]
        assert (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b), key
    h, w = (8, 8) if isinstance(model.config.sample_size, int) else model.config.sample_size
    x = _x(h=h, w=w)
    with torch.no_grad():
        assert torch.equal(model(x, 7).sample, loaded(x, 7).sample)


def test_attention_head_padding_is_exact(monkeypatch):
    """Narrow heads are zero-padded for SDPA's fast kernels (to 16 wide on CPU; on GPUs to a multiple of 8
    for 16-bit inputs, of 4 for float32); the output equals plain softmax attention either way."""
    from latent_ddpm import unet as unet_module

    assert [unet_module._head_padding(d, "cuda", torch.bfloat16) for d in (4, 12, 16, 64)] == [4, 4, 0, 0]
    assert [unet_module._head_padding(d, "cuda", torch.float16) for d in (4, 6, 8)] == [4, 2, 0]
    assert [unet_module._head_padding(d, "cuda") for d in (2, 4, 6, 12)] == [2, 0, 2, 0]  # float32
    assert [unet_module._head_padding(d, "cpu") for d in (4, 8, 16, 32)] == [12, 8, 0, 0]
    assert unet_module._head_padding(4, "meta") == 0  # FLOP counting sees the model's own work
    torch.manual_seed(0)
    attn = SelfAttention(channels=16, num_heads=4, groups=4).eval()  # head_dim 4
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        tokens = attn.norm(x).permute(0, 2, 3, 1).reshape(2, 16, 16)
        q, k, v = attn.to_qkv(tokens).view(2, 16, 3, 4, 4).permute(2, 0, 3, 1, 4)
        ref = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v  # scale 1/sqrt(4)
        ref = x + attn.to_out(ref.transpose(1, 2).reshape(2, 16, 16)).view(2, 4, 4, 16).permute(0, 3, 1, 2)
        real = unet_module._head_padding
        for device_type, dtype in (("cpu", None), ("cuda", torch.bfloat16)):  # the GPU padding, on CPU
            monkeypatch.setattr(unet_module, "_head_padding",
                                lambda d, _t, dt, kind=device_type, as_dtype=dtype: real(d, kind, as_dtype or dt))
            torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


def test_the_forward_is_one_graph_without_breaks():
    # README: "compile-friendly (one graph, no breaks)"; argument checks must stay static (shape/dtype only).
    import torch._dynamo as dynamo

    model = AdvancedUNet2DModel.from_preset("tiny", in_channels=4, sample_size=8, num_class_embeds=3)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 5])
    for kwargs in ({}, {"class_labels": torch.tensor([0, 1])}):
        report = dynamo.explain(model)(x, t, **kwargs)
        assert (report.graph_count, report.graph_break_count) == (1, 0), report.break_reasons
