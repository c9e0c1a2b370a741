"""CRO and epsilon objectives against values computed by hand.

The schedule ᾱ = [1, 0.9216, 0.64, 0.36, 0.0784] is chosen so that every √ᾱ and √(1 − ᾱ) is exact:
t:        0     1     2     3     4
√ᾱ:       1   0.96   0.8   0.6   0.28
√(1−ᾱ):   0   0.28   0.6   0.8   0.96
"""
import pytest
import torch

from erasekit.train import cro, epsilon

ALPHAS = torch.tensor([1.0, 0.9216, 0.64, 0.36, 0.0784])


def full(value, batch=1):
    return torch.full((batch, 1, 2, 2), float(value))


def t(*values):
    return torch.tensor(values, dtype=torch.long)


def test_mix_weight_is_one_minus_alpha_bar():
    lam = cro.mix_weight(ALPHAS, t(0, 2, 3, 4), full(0, batch=4))
    assert lam.shape == (4, 1, 1, 1)
    assert lam.flatten().tolist() == pytest.approx([0.0, 0.36, 0.64, 0.9216])


def test_mixed_chain_by_hand():
    # t=2: λ = 0.36, x̃ = 0.64·1 + 0.36·3 = 1.72, x = 0.8·1.72 + 0.6·2 = 2.576
    ori, obj, noise = full(1), full(3), full(2)
    assert cro.mixed_clean(ori, obj, ALPHAS, t(2)).flatten().tolist() == pytest.approx([1.72] * 4)
    assert cro.mixed_chain(ori, obj, noise, ALPHAS, t(2)).flatten().tolist() == pytest.approx([2.576] * 4)
    # at t=0 the chain is the clean image: the object has faded out completely
    assert torch.equal(cro.mixed_chain(ori, obj, noise, ALPHAS, t(0)), ori)


def test_ddim_jump_by_hand():
    # t=3 → 1, x_t = 1, ε̂ = 0.5: x̂0 = (1 − 0.8·0.5)/0.6 = 1, x_1 = 0.96·1 + 0.28·0.5 = 1.1
    out = cro.ddim_jump(full(1), full(0.5), ALPHAS, t(3), t(1))
    assert out.flatten().tolist() == pytest.approx([1.1] * 4)


def test_ddim_jump_per_sample_timesteps():
    # two samples with different (t, t′): each uses its own ᾱ
    x_t = torch.cat([full(1), full(1)])
    eps = torch.cat([full(0.5), full(0.5)])
    out = cro.ddim_jump(x_t, eps, ALPHAS, t(3, 2), t(1, 0))
    # second: x̂0 = (1 − 0.6·0.5)/0.8 = 0.875, jump to t′=0 gives x̂0 itself
    assert out[0].flatten().tolist() == pytest.approx([1.1] * 4)
    assert out[1].flatten().tolist() == pytest.approx([0.875] * 4)


def test_ddim_jump_with_true_noise_stays_on_the_plain_chain():
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    x_t = epsilon.add_noise(x0, noise, ALPHAS, t(4, 3))
    jumped = cro.ddim_jump(x_t, noise, ALPHAS, t(4, 3), t(1, 2))
    assert torch.allclose(jumped, epsilon.add_noise(x0, noise, ALPHAS, t(1, 2)), atol=1e-5)


def test_cro_target_by_hand():
    # t′=1: x̃ = 0.9216·1 + 0.0784·3 = 1.1568, target = 0.96·1.1568 + 0.28·2 = 1.670528
    target = cro.cro_target(full(1), full(3), full(2), ALPHAS, t(1))
    assert target.flatten().tolist() == pytest.approx([1.670528] * 4)


def test_cro_loss_by_hand():
    # x_3^mix = 0.6·(0.36·1 + 0.64·3) + 0.8·2 = 2.968; ε̂ = 0.5 → x̂0 = (2.968 − 0.4)/0.6 = 4.28,
    # x̂_1 = 0.96·4.28 + 0.28·0.5 = 4.2488; loss = (4.2488 − 1.670528)² = 6.647486505984
    seen = {}

    def predict(x_t, timesteps):
        seen["x_t"], seen["t"] = x_t, timesteps
        return torch.full_like(x_t, 0.5)

    loss = cro.cro_loss(predict, full(1), full(3), full(2), t(3), t(1), ALPHAS)
    assert seen["x_t"].flatten().tolist() == pytest.approx([2.968] * 4)
    assert seen["t"].tolist() == [3]
    assert loss.item() == pytest.approx(6.647486505984, rel=1e-5)


def test_cro_without_object_and_perfect_model_is_zero():
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    loss = cro.cro_loss(lambda x, ts: noise, x0, x0, noise, t(4, 3, 2), t(0, 1, 1), ALPHAS)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


def test_cro_rejects_bad_input():
    with pytest.raises(ValueError, match="same size"):
        cro.cro_loss(lambda x, ts: x, full(1), torch.zeros(1, 1, 3, 3), full(0), t(3), t(1), ALPHAS)
    with pytest.raises(ValueError, match="backwards"):
        cro.cro_loss(lambda x, ts: x, full(1), full(1), full(0), t(2), t(2), ALPHAS)


def test_sample_cro_timesteps_ranges_and_determinism():
    gen = torch.Generator().manual_seed(0)
    ts, prev = cro.sample_cro_timesteps(4000, 1000, generator=gen)
    jumps = ts - prev
    assert ts.min() >= 1 and ts.max() <= 999
    assert prev.min() >= 0 and bool((prev < ts).all())
    assert jumps.max() == 100 and jumps.min() == 1
    # away from the floor, γ is uniform on 1..100
    free = jumps[ts > 100]
    assert set(free.tolist()) == set(range(1, 101))
    again = cro.sample_cro_timesteps(4000, 1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], ts) and torch.equal(again[1], prev)
    with pytest.raises(ValueError):
        cro.sample_cro_timesteps(1, 1000, max_jump=0)


def test_add_noise_and_epsilon_loss_by_hand():
    # t=2: 0.8·1 + 0.6·2 = 2.0
    assert epsilon.add_noise(full(1), full(2), ALPHAS, t(2)).flatten().tolist() == pytest.approx([2.0] * 4)
    noise = torch.tensor([1.0, -2.0, 3.0, 0.0]).reshape(1, 1, 2, 2)
    assert epsilon.epsilon_loss(lambda x, ts: noise, full(1), noise, t(2), ALPHAS).item() == 0.0
    # a model that predicts zero pays the noise's mean square: (1 + 4 + 9 + 0) / 4
    zero = epsilon.epsilon_loss(lambda x, ts: torch.zeros_like(x), full(1), noise, t(2), ALPHAS)
    assert zero.item() == pytest.approx(3.5)


def test_scaled_linear_schedule_matches_diffusers():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    assert torch.allclose(epsilon.scaled_linear_alphas_cumprod(), ref.float(), atol=1e-6)


def test_cro_loss_falls_when_training_a_small_denoiser():
    """A small conv ε-model learns the object-removing chain: the CRO loss falls."""
    torch.manual_seed(0)
    alphas = epsilon.scaled_linear_alphas_cumprod()
    model = torch.nn.Sequential(torch.nn.Conv2d(5, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(16, 4, 3, padding=1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ori = torch.randn(8, 4, 8, 8)
    obj = ori.clone()
    obj[:, :, 2:6, 2:6] = 2.0
    gen = torch.Generator().manual_seed(1)

    def step():
        noise = torch.randn(ori.shape, generator=gen)
        ts, prev = cro.sample_cro_timesteps(8, 1000, generator=gen)

        def predict(x_t, timesteps):
            level = (timesteps.float() / 1000).reshape(-1, 1, 1, 1).expand(-1, 1, *x_t.shape[2:])
            return model(torch.cat([x_t, level], dim=1))

        return cro.cro_loss(predict, ori, obj, noise, ts, prev, alphas)

    losses = []
    for _ in range(150):
        loss = step()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20
