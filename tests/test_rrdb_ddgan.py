"RRDB LR encoder and time-conditioned discriminator: structure, residual scaling, dense connectivity (functional reference), dependence of D."
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffsr_kit.models.ddgan import DiscConfig, Discriminator
from diffsr_kit.models.layers import count_params
from diffsr_kit.models.rrdb import RRDB, RRDBConfig, RRDBEncoder, ResidualDenseBlock

BETA = 0.2  # ESRGAN's residual scaling


def zero_(module):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
                if m.bias is not None: m.bias.zero_()
    return module


# ---- RRDB ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('cfg,hw', [(RRDBConfig(nf=16, nb=2, gc=8), (16, 16)), (RRDBConfig(in_ch=1, nf=8, nb=1, gc=4), (7, 12)),
                                    (RRDBConfig(nf=8, nb=1, gc=4, out_ch=5), (8, 8))])
def test_rrdb_encoder_shape_and_no_batchnorm(cfg, hw):
    enc = RRDBEncoder.from_config(cfg)
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d))
                   for m in enc.modules())
    x = torch.rand(3, cfg.in_ch, *hw) * 2 - 1
    assert enc(x).shape == (3, cfg.out_ch or cfg.nf, *hw)
    assert enc.out_channels == (cfg.out_ch or cfg.nf)
    # fully convolutional at LR size: no upsampling tail, no final conv to image channels
    assert all(m.out_channels in (cfg.nf, cfg.gc, cfg.out_ch) for m in enc.modules() if isinstance(m, nn.Conv2d))


def test_dense_block_matches_functional_reference():
    "RDB written out from ESRGAN's definition with the module's own weights: dense concatenation, LReLU 0.2, x + 0.2 * conv5."
    torch.manual_seed(0)
    rdb = ResidualDenseBlock(nf=6, gc=3)
    with torch.no_grad():
        for c in rdb.convs: c.weight.normal_(0, 0.3); c.bias.normal_(0, 0.1)  # non-trivial weights
    x = torch.randn(2, 6, 5, 4)
    w = [(c.weight, c.bias) for c in rdb.convs]
    x1 = F.leaky_relu(F.conv2d(x, *w[0], padding=1), 0.2)
    x2 = F.leaky_relu(F.conv2d(torch.cat((x, x1), 1), *w[1], padding=1), 0.2)
    x3 = F.leaky_relu(F.conv2d(torch.cat((x, x1, x2), 1), *w[2], padding=1), 0.2)
    x4 = F.leaky_relu(F.conv2d(torch.cat((x, x1, x2, x3), 1), *w[3], padding=1), 0.2)
    x5 = F.conv2d(torch.cat((x, x1, x2, x3, x4), 1), *w[4], padding=1)
    torch.testing.assert_close(rdb(x), x + BETA * x5)


def test_residual_scaling():
    torch.manual_seed(1)
    x = torch.randn(2, 8, 6, 6)
    # dense block: convs 1-4 and conv5's weights zero, conv5 bias b -> x + 0.2 b
    rdb = zero_(ResidualDenseBlock(8, 4))
    b = torch.randn(8)
    with torch.no_grad(): rdb.convs[4].bias.copy_(b)
    torch.testing.assert_close(rdb(x), x + BETA * b.view(1, 8, 1, 1))
    # RRDB with all dense convs zero: each dense block is the identity, RRDB = x + 0.2 x
    torch.testing.assert_close(zero_(RRDB(8, 4))(x), (1 + BETA) * x)
    # encoder with every dense conv zero: F0 + conv_body((1 + 0.2)^nb F0), from plain convolutions
    enc = RRDBEncoder(in_ch=3, nf=8, nb=3, gc=4)
    zero_(enc.body)
    lr = torch.rand(2, 3, 9, 7) * 2 - 1
    with torch.no_grad():
        f0 = F.conv2d(lr, enc.conv_first.weight, enc.conv_first.bias, padding=1)
        ref = f0 + F.conv2d((1 + BETA) ** 3 * f0, enc.conv_body.weight, enc.conv_body.bias, padding=1)
        torch.testing.assert_close(enc(lr), ref)


def test_rrdb_param_count_is_esrgan_minus_tail():
    "ESRGAN RRDBNet(nf 64, nb 23, gc 32) has 16,697,987 parameters; ours lacks upconv1/2, HRconv (3 x 36,928) and conv_last (1,731)."
    with torch.device('meta'): n = count_params(RRDBEncoder(nf=64, nb=23, gc=32))
    assert n == 16_697_987 - 3 * (64 * 64 * 9 + 64) - (64 * 3 * 9 + 3)


def test_rrdb_bad_input():
    with pytest.raises(ValueError, match=r'x\[None\]'): RRDBEncoder(nb=1)(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match='in_ch=1'): RRDBEncoder(nb=1)(torch.rand(1, 1, 8, 8))


# ---- discriminator -----------------------------------------------------------------------------------------

TINY = dict(base_ch=8, ch_mult=(1, 2), t_dim=16)


def inputs(seed, n=3, hw=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, hw, hw, generator=g), torch.randn(n, 3, hw, hw, generator=g)


def test_disc_output_shape():
    torch.manual_seed(0)
    D = Discriminator(DiscConfig(**TINY))
    x_prev, xt = inputs(0, n=5)
    assert D(x_prev, xt, torch.arange(5) % 4).shape == (5,)
    assert D(x_prev, xt, 2).shape == (5,)
    assert Discriminator(DiscConfig(**TINY, time='gamma'))(x_prev, xt, torch.rand(5)).shape == (5,)


def test_disc_depends_on_t_and_both_inputs():
    torch.manual_seed(0)
    D = Discriminator(DiscConfig(**TINY))
    x_prev, xt = inputs(1)
    t = torch.tensor([1, 2, 3])
    with torch.no_grad():
        base = D(x_prev, xt, t)
        for other in (D(x_prev, xt, t - 1), D(x_prev + 0.3 * torch.randn_like(x_prev), xt, t),
                      D(x_prev, xt + 0.3 * torch.randn_like(xt), t)):
            assert ((other - base).abs() > 1e-6).all()   # every sample's logit moves
    # gradients reach both images
    a, b = x_prev.clone().requires_grad_(True), xt.clone().requires_grad_(True)
    D(a, b, t).sum().backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    # swapping the roles of y_{t-1} and y_t changes the verdict (the input is an ordered pair)
    with torch.no_grad(): assert not torch.allclose(D(xt, x_prev, t), base)


def test_disc_samples_independent():
    "No normalisation across the batch: a sample's logit does not depend on the rest of the batch (needed by R1)."
    torch.manual_seed(0)
    D = Discriminator(DiscConfig(**TINY))
    x_prev, xt = inputs(2, n=4)
    t = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        full = D(x_prev, xt, t)
        singles = torch.cat([D(x_prev[i:i + 1], xt[i:i + 1], t[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(full, singles, rtol=1e-5, atol=1e-6)


def test_disc_use_lr():
    torch.manual_seed(0)
    D = Discriminator(DiscConfig(**TINY, use_lr=True))
    x_prev, xt = inputs(3)
    lr = torch.rand(3, 3, 4, 4) * 2 - 1
    t = torch.tensor([1, 1, 1])
    with torch.no_grad(): assert ((D(x_prev, xt, t, lr) - D(x_prev, xt, t, -lr)).abs() > 1e-6).all()
    with pytest.raises(ValueError, match='needs lr'): D(x_prev, xt, t)
    with pytest.raises(ValueError, match='use_lr=True'): Discriminator(DiscConfig(**TINY))(x_prev, xt, t, lr)


def test_disc_bad_input():
    D = Discriminator(DiscConfig(**TINY))
    x_prev, xt = inputs(4)
    with pytest.raises(ValueError, match='same shape'): D(x_prev, xt[:2], 1)
    with pytest.raises(ValueError, match='multiple of 4'): D(x_prev[..., :14, :14], xt[..., :14, :14], 1)
    with pytest.raises(ValueError, match=r'\(N,\)'): D(x_prev, xt, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="'int', 'gamma'"): DiscConfig(time='sigma').check()
