"""U-Net and its layers: every conditioning mode trains, outputs depend on the right inputs, attention and the
time embedding match independent references, bad input fails clearly, channels-last gives the same result."""
import math
import pytest
import torch
import torch.nn as nn

from diffsr_kit.models.layers import timestep_embedding, CrossAttention2d, SelfAttention2d, count_params
from diffsr_kit.models.unet import UNet, UNetConfig, CONDITIONING

MODES = ['concat', 'multiscale', 'middle', 'latent', 'none']
TINY = dict(base_ch=16, ch_mult=(1, 2), n_res=1, attn_res=(8,), heads=2, image_size=16)


def make(mode, **kw):
    "A tiny U-Net: 16x16 RGB x_t (or an 8x8 4-channel latent for mode 'latent')."
    if mode == 'latent':
        return UNet(UNetConfig(in_ch=4, out_ch=4, cond=mode, **{**TINY, 'image_size': 8, 'attn_res': (4,), **kw}))
    return UNet(UNetConfig(cond=mode, **{**TINY, **kw}))


def inputs(mode, n=2, seed=0, lr_size=None):
    "x_t, t, lr for `make(mode)`; the LR image is 4x4 (x4 SR) or, for 'latent', 16x16 (larger than the latent)."
    g = torch.Generator().manual_seed(seed)
    xt = torch.randn(n, 4, 8, 8, generator=g) if mode == 'latent' else torch.randn(n, 3, 16, 16, generator=g)
    s = lr_size or (16 if mode == 'latent' else 4)
    lr = torch.rand(n, 3, s, s, generator=g) * 2 - 1
    return xt, torch.tensor([3, 700][:n]), lr


def wake(net, std=0.05, seed=1):
    "Replace every all-zero parameter (zero-initialised convs / projections) by small random values."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().max() == 0: p.copy_(torch.randn(p.shape, generator=g) * std)
    return net.eval()


@pytest.mark.parametrize('mode', MODES)
def test_shape_and_loss_falls(mode):
    torch.manual_seed(0)
    net = make(mode)
    xt, t, lr = inputs(mode)
    y = net(xt, t, lr)
    assert y.shape == xt.shape
    assert y.abs().max() == 0  # zero-initialised output conv: the untrained net predicts 0
    target = torch.randn(xt.shape, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = (net(xt, t, lr) - target).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (mode, losses[0], losses[-1])


@pytest.mark.parametrize('mode,lr_size', [('concat', 4), ('multiscale', 4), ('middle', 8), ('latent', 16), ('latent', 4)])
def test_output_depends_on_lr_and_t(mode, lr_size):
    net = wake(make(mode))
    xt, t, lr = inputs(mode, lr_size=lr_size)
    with torch.no_grad():
        y = net(xt, t, lr)
        assert (net(xt, t, -lr) - y).abs().max() > 1e-4          # lr matters
        assert (net(xt, t + 50, lr) - y).abs().max() > 1e-4      # t matters
        y2 = net(xt, t, lr)
    assert torch.equal(y, y2)  # eval mode: deterministic


def test_none_ignores_lr_but_not_t():
    net = wake(make('none'))
    xt, t, lr = inputs('none')
    with torch.no_grad():
        y = net(xt, t, lr)
        assert torch.equal(y, net(xt, t, -lr)) and torch.equal(y, net(xt, t))
        assert (net(xt, t + 50) - y).abs().max() > 1e-4


def test_output_depends_on_z_ctx_and_gamma():
    net = wake(make('concat', z_dim=8, ctx_ch=12, time='gamma', learn_sigma=True))
    xt, _, lr = inputs('concat')
    gam, z, ctx = torch.tensor([0.2, 0.8]), torch.randn(2, 8), torch.randn(2, 5, 12)
    with torch.no_grad():
        y = net(xt, gam, lr, z=z, ctx=ctx)
        assert y.shape == (2, 6, 16, 16)  # learn_sigma: mean and variance channels
        assert (net(xt, gam, lr, z=torch.randn(2, 8), ctx=ctx) - y).abs().max() > 1e-4
        assert (net(xt, gam, lr, z=z, ctx=torch.randn(2, 5, 12)) - y).abs().max() > 1e-4
        assert (net(xt, gam * 0.9, lr, z=z, ctx=ctx) - y).abs().max() > 1e-4
        # a (N, ctx_ch, h, w) map is the same as its flattened (N, h*w, ctx_ch) tokens
        cmap = torch.randn(2, 12, 2, 3)
        torch.testing.assert_close(net(xt, gam, lr, z=z, ctx=cmap),
                                   net(xt, gam, lr, z=z, ctx=cmap.flatten(2).transpose(1, 2)), rtol=0, atol=1e-6)


@pytest.mark.parametrize('dim', [8, 9, 64])
def test_timestep_embedding_matches_loop(dim):
    def ref(tv, c):  # slow reference with Python's math
        half = dim // 2
        w = [10000.0 ** (-k / half) for k in range(half)]
        return [math.sin(c * tv * wk) for wk in w] + [math.cos(c * tv * wk) for wk in w] + [0.0] * (dim % 2)
    for tv, c in [(0, 1.0), (1, 1.0), (17, 1.0), (999, 1.0), (0.05, 1000.0), (0.731, 1000.0)]:
        got = timestep_embedding(torch.tensor([tv]), dim, scale=c)[0].double()
        # float32 arguments up to ~1000 rad: absolute error of sin/cos ~ 1000 * 6e-8 -> tolerance 2e-4
        torch.testing.assert_close(got, torch.tensor(ref(tv, c), dtype=torch.float64), rtol=0, atol=2e-4)


def _mha_ref_cross(m, x, ctx):
    "Reference 1: nn.MultiheadAttention loaded with the module's projection weights."
    N, C, H, W = x.shape
    mha = nn.MultiheadAttention(C, m.heads, kdim=ctx.shape[-1], vdim=ctx.shape[-1], batch_first=True)
    with torch.no_grad():
        mha.q_proj_weight.copy_(m.to_q.weight); mha.k_proj_weight.copy_(m.to_k.weight); mha.v_proj_weight.copy_(m.to_v.weight)
        mha.in_proj_bias.copy_(torch.cat([m.to_q.bias, m.to_k.bias, m.to_v.bias]))
        mha.out_proj.weight.copy_(m.proj.weight); mha.out_proj.bias.copy_(m.proj.bias)
        tok = m.norm(x).flatten(2).transpose(1, 2)
        out = mha(tok, ctx, ctx, need_weights=False)[0]
    return x + out.transpose(1, 2).reshape(N, C, H, W)


def _softmax_ref_cross(m, x, ctx):
    "Reference 2: explicit softmax(Q K^T / sqrt(d)) V per head, in float64."
    N, C, H, W = x.shape
    d = C // m.heads
    with torch.no_grad():
        tok = m.norm(x).flatten(2).transpose(1, 2).double()
        q = tok @ m.to_q.weight.double().T + m.to_q.bias.double()
        k = ctx.double() @ m.to_k.weight.double().T + m.to_k.bias.double()
        v = ctx.double() @ m.to_v.weight.double().T + m.to_v.bias.double()
        heads = []
        for i in range(m.heads):
            sl = slice(i * d, (i + 1) * d)
            a = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), dim=-1)
            heads.append(a @ v[..., sl])
        out = torch.cat(heads, -1) @ m.proj.weight.double().T + m.proj.bias.double()
    return (x.double() + out.transpose(1, 2).reshape(N, C, H, W)).float()


def test_cross_attention_matches_references():
    torch.manual_seed(0)
    m = CrossAttention2d(8, ctx_ch=6, heads=2)
    x, ctx = torch.randn(2, 8, 4, 4), torch.randn(2, 7, 6)
    with torch.no_grad():
        torch.testing.assert_close(m(x, ctx), x)  # zero-initialised output projection: identity at first
        nn.init.normal_(m.proj.weight, std=0.5); nn.init.normal_(m.proj.bias, std=0.1)
        got = m(x, ctx)
    # float32 vs float64 / another kernel: tolerance 1e-5
    torch.testing.assert_close(got, _softmax_ref_cross(m, x, ctx), rtol=0, atol=1e-5)
    torch.testing.assert_close(got, _mha_ref_cross(m, x, ctx), rtol=0, atol=1e-5)
    assert (got - x).abs().max() > 1e-2  # the references are not trivially equal to the input


def test_self_attention_matches_multihead_attention():
    torch.manual_seed(0)
    m = SelfAttention2d(8, heads=4)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        nn.init.normal_(m.proj.weight, std=0.5)
        mha = nn.MultiheadAttention(8, 4, batch_first=True)
        mha.in_proj_weight.copy_(m.qkv.weight); mha.in_proj_bias.copy_(m.qkv.bias)
        mha.out_proj.weight.copy_(m.proj.weight); mha.out_proj.bias.copy_(m.proj.bias)
        tok = m.norm(x).flatten(2).transpose(1, 2)
        ref = x + mha(tok, tok, tok, need_weights=False)[0].transpose(1, 2).reshape(x.shape)
        torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5)


def test_errors():
    net = make('concat', ch_mult=(1, 2, 2))  # two downsamplings: sides must be multiples of 4
    xt, t, lr = inputs('concat')
    with pytest.raises(ValueError, match=r'18x18 is not divisible by 4.*crop or pad'):
        net(torch.randn(1, 3, 18, 18), t[:1], lr[:1])
    with pytest.raises(ValueError, match=r"cond='concat' needs the LR image"):
        net(xt, t)
    with pytest.raises(ValueError, match=r"Unknown conditioning mode cond='sr3'.*'concat', 'multiscale', 'middle', 'latent', 'none'"):
        UNet(UNetConfig(cond='sr3'))
    with pytest.raises(ValueError, match=r'z_dim=4 but z is None'):
        make('concat', z_dim=4)(xt, t, lr)
    with pytest.raises(ValueError, match=r'attn_res=\(12,\)'):
        make('concat', attn_res=(12,))
    with pytest.raises(TypeError, match=r"time='gamma' expects float"):
        make('concat', time='gamma')(xt, t, lr)


@pytest.mark.parametrize('mode', MODES)
def test_channels_last_same_output(mode):
    net = wake(make(mode, z_dim=4, ctx_ch=8))
    xt, t, lr = inputs(mode)
    z, ctx = torch.randn(2, 4), torch.randn(2, 3, 8)
    cl = torch.channels_last
    with torch.no_grad():
        y0 = net(xt, t, lr, z=z, ctx=ctx)
        y1 = net.to(memory_format=cl)(xt.to(memory_format=cl), t, lr.to(memory_format=cl), z=z, ctx=ctx)
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-5)  # same math, different kernel order: 1e-5


def test_registry_and_count_params():
    assert set(CONDITIONING) == set(MODES)
    assert all(c.source for c in CONDITIONING.values())
    assert count_params(nn.Conv2d(3, 5, 3)) == 5 * 3 * 3 * 3 + 5
    # the LR branches add parameters on top of the plain concat network
    assert count_params(make('multiscale')) > count_params(make('concat')) > count_params(make('none'))


@pytest.mark.parametrize('mode', ['multiscale', 'middle', 'concat'])
def test_lr_reaches_the_net_through_the_mode_branch(mode):
    "With the LR channels of the input conv zeroed, only the mode's own LR branch can carry the LR image."
    net = wake(make(mode))
    with torch.no_grad():
        net.in_conv.weight[:, 3:] = 0  # input channels 3: are the bicubic LR stacked with x_t
        xt, t, lr = inputs(mode)
        d = (net(xt, t, -lr) - net(xt, t, lr)).abs().max()
    if mode == 'concat': assert d == 0       # concat has no other way in
    else: assert d > 1e-4                     # multiscale (every level) and middle (bottleneck) do


def test_no_graph_breaks():
    "torch.compile-friendly: dynamo traces the whole forward (with z, ctx and LR injection) as one graph."
    import torch._dynamo
    net = make('multiscale', z_dim=4, ctx_ch=8).eval()
    xt, t, lr = inputs('multiscale')
    ex = torch._dynamo.explain(net)(xt, t, lr, z=torch.randn(2, 4), ctx=torch.randn(2, 3, 8))
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1
