"""Every network: tiny forward and backward; DecM vs Dec2D; paper-scale shapes on meta."""

import pytest
import torch

from caldm.config import preset
from caldm.data.labels import reduce_label
from caldm.nn.factory import MODULES, build, model_info
from caldm.nn.nets.dec_m import DecM
from caldm.nn.nets.diffusion_unet import widen_input

TINY = preset("tiny")


def _inputs(name: str, cfg, b: int = 2) -> tuple:
    m = cfg.model
    c, hl, wl = m.slice_latent_shape
    d, h, w = m.image_shape
    t = torch.randint(0, 1000, (b,))
    return {
        "enc2d": (torch.randn(b, 1, h, w),),
        "dec2d": (torch.randn(b, c, hl, wl),),
        "enc3d": (torch.randn(b, 1, *m.thumbnail_shape),),
        "f_sr": (torch.randn(b, *m.latent_shape),),
        "diff3d": (torch.randn(b, *m.latent_shape), t),
        "refiner": (torch.randn(b, c, hl, wl), t, torch.randn(b, c, hl, wl)),
        "disc": (torch.randn(b, 1, h, w),),
    }[name]


def _expected(name: str, cfg, b: int = 2) -> tuple:
    m = cfg.model
    c, hl, wl = m.slice_latent_shape
    d, h, w = m.image_shape
    return {
        "enc2d": (b, c, hl, wl),
        "dec2d": (b, 1, h, w),
        "enc3d": (b, *m.latent_shape),
        "f_sr": (b, *m.z_sr_shape),
        "diff3d": (b, *m.latent_shape),
        "refiner": (b, c, hl, wl),
    }.get(name)


@pytest.mark.parametrize("name", ["enc2d", "dec2d", "enc3d", "f_sr", "diff3d", "refiner", "disc"])
def test_tiny_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    net = build(name, TINY)
    out = net(*_inputs(name, TINY))
    if name in ("enc2d", "enc3d"):  # (mean, log-variance)
        assert out[0].shape == out[1].shape
        out = out[0] + out[1]
    out = out[-1] if name == "disc" else out
    if _expected(name, TINY):
        assert tuple(out.shape) == _expected(name, TINY)
    # not out^2: MONAI zero-initialises the UNets' output conv, so out^2 has no gradient
    (out.float() - 0.5).square().mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    a = build("diff3d", TINY)
    b = build("diff3d", TINY)
    b.load_state_dict(a.state_dict())
    b.checkpoint_activations()
    x, t = _inputs("diff3d", TINY)
    a(x, t).square().mean().backward()
    b(x, t).square().mean().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6)


def _dec_m(alpha: float) -> tuple[torch.nn.Module, DecM]:
    torch.manual_seed(0)
    dec2d = build("dec2d", TINY).eval()
    adaptors = build("adaptors", TINY)
    for a in adaptors.adaptors.values():
        a.alpha.data.fill_(alpha)
        if alpha:  # a trained conv (residual adaptors start with a zero one)
            torch.nn.init.normal_(a.conv.weight, std=0.05)
    return dec2d, DecM(dec2d, adaptors).eval()


@pytest.mark.parametrize("form", ["mix", "residual"])
def test_fresh_adaptors_are_the_identity_and_residual_ones_learn(form: str) -> None:
    cfg = preset("tiny")
    cfg.model.adaptor.form = form
    cfg.model.adaptor.alpha_init = 1.0 if form == "residual" else 0.0
    torch.manual_seed(0)
    dec2d = build("dec2d", cfg).eval()
    dec_m = DecM(dec2d, build("adaptors", cfg))
    z = torch.randn(1, 6, *cfg.model.slice_latent_shape)
    out = dec_m(z)
    per_slice = torch.stack([dec2d(z[:, i]) for i in range(6)], 1)
    assert torch.allclose(out, per_slice, atol=1e-5)
    out.square().mean().backward()
    conv_grad = sum(a.conv.weight.grad.abs().sum() for a in dec_m.adaptors.adaptors.values())
    # the reason for "residual": with mix at alpha 0 the conv is never trained
    assert (conv_grad > 0) == (form == "residual")


@torch.no_grad()
def test_dec_m_equals_dec2d_with_adaptors_disabled() -> None:
    dec2d, dec_m = _dec_m(alpha=0.7)
    z = torch.randn(2, 5, *TINY.model.slice_latent_shape)
    per_slice = torch.stack([dec2d(z[:, i]) for i in range(5)], 1)
    assert torch.allclose(dec_m(z, use_adaptors=False), per_slice, atol=1e-5)
    # and adaptors that are on do change the output: the comparison above has teeth
    assert not torch.allclose(dec_m(z), per_slice, atol=1e-3)


@torch.no_grad()
def test_fresh_adaptors_start_as_identity() -> None:
    dec2d, dec_m = _dec_m(alpha=0.0)
    z = torch.randn(1, 5, *TINY.model.slice_latent_shape)
    assert torch.allclose(dec_m.decode_center(z), dec2d(z[:, 2]), atol=1e-5)


@torch.no_grad()
def test_adaptors_mix_across_slices() -> None:
    _, dec_m = _dec_m(alpha=0.7)
    z = torch.randn(1, 5, *TINY.model.slice_latent_shape)
    z2 = z.clone()
    z2[:, 0] += 1.0  # change a neighbour only
    assert not torch.allclose(dec_m.decode_center(z), dec_m.decode_center(z2), atol=1e-4)


@pytest.mark.parametrize("kind", ["layers", "vessels"])
def test_condition_encoders_land_on_the_latent_grid(kind: str) -> None:
    m = TINY.model
    d, h, w = m.image_shape
    for name, label_shape, grid in (
        ("cond_diff3d", (d, h, w) if kind == "layers" else (d, w), m.latent_shape[1:]),
        ("cond_refiner", (h, w) if kind == "layers" else (w,), m.slice_latent_shape[1:]),
    ):
        enc = build(name, TINY, condition=kind, num_classes=9)
        label = torch.randint(0, 9 if kind == "layers" else 3, (2, *label_shape))
        grid2 = tuple(2 * g for g in enc.label_grid)
        feats = enc(torch.stack([reduce_label(x, kind, grid2, 9) for x in label]))
        with pytest.raises(ValueError, match="class fractions"):
            enc(label)  # a raw class map is refused: labels are reduced first
        assert tuple(feats.shape) == (2, m.condition.channels, *grid)
        feats.square().mean().backward()


@torch.no_grad()
def test_widen_input_keeps_the_unconditional_output() -> None:
    torch.manual_seed(0)
    net = build("refiner", TINY).eval()
    x, t, guide = _inputs("refiner", TINY)
    before = net(x, t, guide)
    widen_input(net, 8)
    after = net(x, t, torch.cat([guide, torch.randn(2, 8, *guide.shape[2:])], 1))
    assert torch.allclose(before, after, atol=1e-5)


def test_paper_networks_build_with_paper_shapes_on_meta() -> None:
    cfg = preset("paper")
    with torch.device("meta"):
        for name in ("enc3d", "f_sr", "diff3d", "refiner", "dec2d", "enc2d"):
            net = build(name, cfg)
            with torch.no_grad():
                out = net(*_inputs(name, cfg, b=1))
            out = out[0] if isinstance(out, tuple) else out
            assert tuple(out.shape) == _expected(name, cfg, b=1), name


def test_info_counts_every_module() -> None:
    info = model_info("paper")
    assert set(info["params"]) == set(MODULES)
    assert info["latent_shape"] == [4, 64, 64, 64] and info["k"] == 5
    assert all(n > 0 for n in info["params"].values())


def test_adaptor_levels_select_decoder_levels() -> None:
    from caldm.nn.nets.dec_m import resblock_levels

    dec2d = build("dec2d", TINY)
    levels = resblock_levels(dec2d)
    assert levels[0] == 0 and levels[-1] == len(TINY.model.ae2d.channels) - 1
    assert levels == sorted(levels)
    only_top = TINY.model_copy(deep=True)
    only_top.model.adaptor.levels = [levels[-1]]
    n_all = len(build("adaptors", TINY).adaptors)
    n_top = len(build("adaptors", only_top).adaptors)
    assert 0 < n_top < n_all


def test_default_perceptual_term_needs_no_download_and_penalises_smoothing() -> None:
    import torch.nn.functional as F

    from caldm.config import LossConfig
    from caldm.errors import ConfigError
    from caldm.nn.losses import HybridLoss

    assert HybridLoss(LossConfig()).perceptual_kind == "spectral"
    loss = HybridLoss(LossConfig(perceptual="ssim"))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 64, 64, generator=g) * 2 - 1  # speckle-like texture
    smooth = F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
    shifted = x + (smooth - x).abs().mean()  # as far from x in L1, texture kept
    parts = {name: loss(x, y) for name, y in (("same", x), ("smooth", smooth), ("shift", shifted))}
    assert parts["smooth"]["l1"] == pytest.approx(parts["shift"]["l1"].item(), rel=1e-4)
    assert parts["same"]["perceptual"] < 1e-4
    assert parts["smooth"]["perceptual"] > 5 * parts["shift"]["perceptual"]
    spectral = HybridLoss(LossConfig(perceptual="spectral"))
    other = torch.rand(2, 1, 64, 64, generator=g) * 2 - 1  # same texture, elsewhere
    # amplitude spectra: another speckle pattern is closer than a smoothed copy of x, in L1
    # it is the other way round
    assert (x - other).abs().mean() > (x - smooth).abs().mean()
    assert spectral(x, other)["perceptual"] < 0.6 * spectral(x, smooth)["perceptual"]
    assert "perceptual" not in HybridLoss(LossConfig(perceptual="none"))(x, smooth)
    with pytest.raises(ConfigError, match="perceptual_weights_path"):
        HybridLoss(LossConfig(perceptual="vgg"))


def test_lowpass_l1_leaves_speckle_to_the_other_terms_but_not_anatomy_or_borders() -> None:
    """With ``l1_lowpass_sigma`` the pixel term hardly pays for another draw of the same
    speckle, pays in full for a brightness change, and as much for a wrong border column as
    for a wrong inner one."""
    from caldm.config import LossConfig
    from caldm.nn.losses import HybridLoss

    plain = HybridLoss(LossConfig(perceptual="none"))
    lowpass = HybridLoss(LossConfig(perceptual="none", l1_lowpass_sigma=1.0))
    g = torch.Generator().manual_seed(0)
    anatomy = torch.linspace(-0.8, 0.8, 64).view(1, 1, 64, 1).expand(2, 1, 64, 64)
    x = anatomy * (1 + 0.3 * torch.randn(2, 1, 64, 64, generator=g))  # multiplicative speckle
    other = anatomy * (1 + 0.3 * torch.randn(2, 1, 64, 64, generator=g))
    brighter = x + 0.1

    def l1(loss: HybridLoss, y: torch.Tensor) -> float:
        return loss(x, y)["l1"].item()

    assert l1(lowpass, other) < 0.3 * l1(plain, other)  # a new speckle draw: nearly free
    assert l1(lowpass, brighter) == pytest.approx(l1(plain, brighter), rel=1e-3)
    column = torch.zeros(1, 1, 32, 32)
    column[..., 0] = 0.5
    border, inner = (lowpass(torch.zeros_like(c), c)["l1"] for c in (column, column.roll(9, -1)))
    assert border.item() == pytest.approx(inner.item(), rel=0.15)


def test_column_term_pays_for_latent_driven_columns_not_for_drawn_speckle() -> None:
    """Two decodes of one latent that differ only in their speckle draw score about 1 (the
    real texture is unpredictable: nothing shared to pay for beyond it), the real slice's own
    columns about 0, and one column pattern drawn into every decode far more than either;
    a single decode compared with itself would pay for its speckle too (the biased form)."""
    from caldm.nn.losses import shared_column_texture

    g = torch.Generator().manual_seed(0)
    anatomy = torch.linspace(-0.8, 0.8, 64).view(1, 1, 64, 1)

    def speckled() -> torch.Tensor:
        return anatomy * (1 + 0.3 * torch.randn(16, 1, 64, 64, generator=g))

    x = speckled()
    pattern = 0.05 * torch.randn(1, 1, 1, 64, generator=g)  # fixed columns, as the strips
    drawn = shared_column_texture(x, speckled(), speckled()).item()
    assert drawn == pytest.approx(1.0, abs=0.15)
    assert abs(shared_column_texture(x, x + 0.1 * speckled(), x + 0.1 * speckled()).item()) < 0.1
    assert shared_column_texture(x, speckled() + pattern, speckled() + pattern).item() > 3 * drawn
    one = speckled()
    assert shared_column_texture(x, one, one).item() > 1.5 * drawn
    flat = torch.zeros(1, 1, 64, 64)  # a blank scan: no real texture to divide by
    blank = shared_column_texture(flat, flat + 0.01 * speckled()[:1], flat + 0.01 * speckled()[:1])
    assert abs(blank.item()) < 10  # 1e5-1e6 with an epsilon of 1e-12


def test_adaptive_gan_weight_balances_the_gradients_at_the_decoder_output() -> None:
    """Whatever the discriminator's scale, the adversarial term reaches the decoder's output
    with adv_weight times the reconstruction terms' gradient norm (a fixed weight does not)."""
    from caldm.config import LossConfig
    from caldm.nn.losses import HybridLoss

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    probe = torch.randn(2, 1, 16, 16, generator=g)

    def adv_grad_ratio(adaptive: bool, scale: float) -> float:
        loss = HybridLoss(LossConfig(adv_weight=0.5, adv_adaptive=adaptive, perceptual="none"))
        x_rec = (x * 0.8).requires_grad_(True)
        logits = scale * (probe * x_rec).sum((1, 2, 3))  # a stand-in discriminator
        parts = loss(x, x_rec, logits)
        want = parts["l1"] + parts.get("adv_weight", 0.5) * parts["g_adv"]
        assert parts["loss"].item() == pytest.approx(want.item(), rel=1e-5)  # the logged value
        (rec,) = torch.autograd.grad(parts["l1"], x_rec, retain_graph=True)
        (total,) = torch.autograd.grad(parts["loss"], x_rec)
        return float((total - rec).norm() / rec.norm())

    for scale in (1.0, 100.0):
        assert adv_grad_ratio(True, scale) == pytest.approx(0.5, rel=1e-3)
    assert adv_grad_ratio(False, 100.0) > 100 * adv_grad_ratio(False, 1.0) / 2


def test_dec2d_noise_is_fresh_in_training_and_keyed_by_the_latent_in_evaluation() -> None:
    from caldm.config import preset
    from caldm.nn.blocks.noise import keyed_normal, latent_key
    from caldm.nn.factory import build

    cfg = preset("tiny")
    cfg.model.ae2d.noise = True
    torch.manual_seed(0)
    dec2d = build("dec2d", cfg)
    z = torch.randn(3, *cfg.model.slice_latent_shape)
    cfg_plain = preset("tiny")
    cfg_plain.model.ae2d.noise = False
    without = build("dec2d", cfg_plain)
    without.load_state_dict(dec2d.state_dict(), strict=False)  # all but the noise scales
    with torch.no_grad():
        plain = dec2d.eval()(z)
        torch.testing.assert_close(plain, without.eval()(z))  # scales start at 0: the plain one
        for injection in dec2d.noise.values():
            injection.scale.fill_(0.3)
        noisy = dec2d(z)
        assert (noisy - plain).abs().mean() > 0.01
        torch.testing.assert_close(dec2d(z), noisy)  # reproducible
        torch.testing.assert_close(dec2d(z[1:2]), noisy[1:2])  # batch-independent
        residual = noisy - plain
        assert (residual[0] - residual[1]).abs().mean() > 0.5 * residual[0].abs().mean()
        train = dec2d.train()(z)
        assert not torch.allclose(train, dec2d(z))  # fresh noise each call in training
    # keys whose difference is a multiple of the old pixel step gave shifted copies of one image
    shift = 5
    a = keyed_normal(torch.tensor([12345]), (16, 16)).flatten()
    b = keyed_normal(torch.tensor([12345 + 2 * shift * pow(0x27D4EB2F, -1, 2**32)]), (16, 16))
    b = b.flatten()
    assert torch.corrcoef(torch.stack([a[shift:], b[:-shift]]))[0, 1].abs() < 0.2
    noise = keyed_normal(latent_key(torch.randn(64, 4, 8, 8)), (64, 64))
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1) < 0.01
    # independent slices: |r| ~ 1/64 each, so no pair of the 2016 near 0.1 (6 sd)
    assert noise.flatten(1).corrcoef().fill_diagonal_(0).abs().max() < 0.1
