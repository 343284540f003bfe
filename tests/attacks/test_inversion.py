"""Gradient inversion on tiny models: the objective falls, a noiseless gradient gives the image
back, DP noise destroys it, and the attack's loss and update simulation match fastdp's."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdp.attacks import (
    PCAImagePrior,
    gradient_distance,
    invert_gradients,
    rank_references,
    recover_linear_input,
    simulate_update,
    soft_dice_ce,
)
from fastdp.attacks.experiment import site_update
from fastdp.models import per_sample_loss

H = W = 6


class TinySeg(nn.Module):
    """Flatten -> Linear (bias) -> sigmoid -> Linear -> logits [B, 2, H, W]: the first layer leaks x."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(H * W, hidden)
        self.fc2 = nn.Linear(hidden, 2 * H * W)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x.flatten(1)))).reshape(x.shape[0], 2, H, W)


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x)))


def _batch(b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, H, W, generator=g)
    m = (x[:, 0] > 0.5).long()
    return x, m


def _onehot(m):
    return F.one_hot(m, 2).movedim(-1, 1).float()


def test_soft_dice_ce_matches_fastdp_loss_on_hard_masks():
    logits = torch.randn(3, 2, 8, 8)
    m = torch.randint(0, 2, (3, 8, 8))
    torch.testing.assert_close(soft_dice_ce(logits, _onehot(m)), per_sample_loss(logits, m))


def test_simulated_update_matches_a_fastdp_site_update():
    torch.manual_seed(0)
    model = TinyConv()
    x, m = _batch(2)
    params = {n: p.detach() for n, p in model.named_parameters()}
    # One step: gradient; several: unrolled SGD. Both must be what site_update sends (no DP).
    g = simulate_update(model, params, x, _onehot(m), create_graph=False)
    d1 = site_update(model, x, m, lr=0.5)
    for n in params:
        torch.testing.assert_close(d1[n], -0.5 * g[n], rtol=1e-5, atol=1e-6)
    d3 = site_update(model, x, m, lr=0.5, local_steps=3)
    s3 = simulate_update(model, params, x, _onehot(m), local_steps=3, local_lr=0.5, create_graph=False)
    for n in params:
        torch.testing.assert_close(d3[n], s3[n], rtol=1e-4, atol=1e-6)


def test_simulated_clipping_matches_dp_update_without_noise():
    torch.manual_seed(0)
    model = TinyConv()
    x, m = _batch(3)
    params = {n: p.detach() for n, p in model.named_parameters()}
    g = simulate_update(model, params, x, _onehot(m), max_grad_norm=1e-3, create_graph=False)
    d = site_update(model, x, m, lr=1.0, noise_multiplier=0.0, max_grad_norm=1e-3)
    for n in params:
        torch.testing.assert_close(d[n], -g[n], rtol=1e-4, atol=1e-7)


def test_gradient_distance_values():
    a = [torch.tensor([1.0, 0.0]), torch.tensor([0.0])]
    b = [torch.tensor([0.0, 2.0]), torch.tensor([0.0])]
    assert gradient_distance(a, a, [1, 1], "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert gradient_distance(a, b, [1, 1], "cosine").item() == pytest.approx(1.0)
    assert gradient_distance(a, b, [1, 1], "l2").item() == pytest.approx(5.0)
    assert gradient_distance(a, b, [0.5, 1], "l2").item() == pytest.approx(2.5)


def test_objective_goes_down():
    torch.manual_seed(0)
    model = TinySeg()
    x, m = _batch(1)
    g = simulate_update(model, {n: p.detach() for n, p in model.named_parameters()}, x, _onehot(m), create_graph=False)
    # The last layer's gradient is fixed by the known mask; weight 0 leaves the part that sees x.
    lw = {"fc2.weight": 0.0, "fc2.bias": 0.0}
    res = invert_gradients(
        model, g, image_shape=(1, H, W), masks=m, iterations=60, log_every=10, tv_weight=0, layer_weights=lw
    )
    assert res.history[-1][1] < 0.5 * res.history[0][1]
    assert res.images.shape == (1, 1, H, W) and res.images.min() >= 0 and res.images.max() <= 1


@pytest.mark.parametrize("objective,optimizer,iters", [("cosine", "adam", 300), ("l2", "lbfgs", 15)])
def test_noiseless_gradient_is_inverted_and_dp_noise_stops_it(objective, optimizer, iters):
    torch.manual_seed(0)
    model = TinySeg()
    x, m = _batch(1, seed=1)
    clean = {k: v for k, v in site_update(model, x, m, lr=1.0).items()}
    noisy = site_update(model, x, m, lr=1.0, noise_multiplier=1.0, max_grad_norm=1.0, seed=3)
    kw = dict(
        image_shape=(1, H, W),
        masks=m,
        shared_kind="update",
        local_lr=1.0,
        objective=objective,
        optimizer=optimizer,
        iterations=iters,
        tv_weight=0.0,
        lr=0.1 if optimizer == "adam" else 1.0,
    )
    rec = invert_gradients(model, clean, **kw).images
    rec_dp = invert_gradients(model, noisy, max_grad_norm=1.0, **kw).images
    mse, mse_dp = (rec - x).square().mean().item(), (rec_dp - x).square().mean().item()
    assert mse < 1e-3, mse
    assert mse_dp > 0.02, mse_dp  # uniform [0, 1] pixels: a blind guess of 0.5 has MSE 1/12
    assert mse_dp > 50 * mse


def test_joint_mask_optimisation_runs_and_returns_probabilities():
    torch.manual_seed(0)
    model = TinyConv()
    x, m = _batch(2)
    g = simulate_update(model, {n: p.detach() for n, p in model.named_parameters()}, x, _onehot(m), create_graph=False)
    res = invert_gradients(model, g, image_shape=(1, H, W), num_images=2, iterations=10, restarts=2)
    assert res.mask_probs.shape == (2, 2, H, W)
    torch.testing.assert_close(res.mask_probs.sum(1), torch.ones(2, H, W))
    assert len(res.losses) == 2 and res.loss == min(res.losses)


def test_linear_layer_analytic_recovery_is_exact():
    torch.manual_seed(0)
    model = TinySeg()
    x, m = _batch(1, seed=2)
    g = simulate_update(model, {n: p.detach() for n, p in model.named_parameters()}, x, _onehot(m), create_graph=False)
    rec = recover_linear_input(g["fc1.weight"], g["fc1.bias"]).reshape(1, 1, H, W)
    torch.testing.assert_close(rec, x, rtol=1e-4, atol=1e-5)


def test_pca_prior_round_trip():
    ref = torch.rand(20, 1, 4, 4)
    prior = PCAImagePrior(ref, components=19)  # centred rank is 19: exact on the references
    z = prior.encode(ref[:3])
    torch.testing.assert_close(prior.decode(z), ref[:3], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(prior.mean_image(), ref.mean(0))


def test_rank_references_puts_the_true_image_first():
    torch.manual_seed(0)
    model = TinyConv()
    x, m = _batch(1, seed=4)
    refs = torch.cat([torch.rand(7, 1, H, W, generator=torch.Generator().manual_seed(5)), x])
    delta = site_update(model, x, m, lr=0.1)
    dists, order = rank_references(model, delta, refs, m, shared_kind="update", local_lr=0.1)
    assert order[0].item() == 7 and dists[7].item() < 1e-5
    assert dists[order[1]].item() > 1e-3


def test_noise_std_attack_returns_clean_images_in_the_box():
    torch.manual_seed(0)
    model = TinySeg()
    x, m = _batch(1, seed=1)
    g = simulate_update(model, {n: p.detach() for n, p in model.named_parameters()}, x, _onehot(m), create_graph=False)
    res = invert_gradients(model, g, image_shape=(1, H, W), masks=m, iterations=100, noise_std=0.02, tv_weight=0)
    assert res.images.min() >= 0 and res.images.max() <= 1
    assert (res.images - x).square().mean().item() < 0.02  # still close: a small noise does not derail it


def test_simulated_adam_update_matches_a_federated_adam_site():
    from fastdp.attacks.experiment import federated_site_update

    torch.manual_seed(0)
    model = TinyConv()
    x, m = _batch(2)
    params = {n: p.detach() for n, p in model.named_parameters()}
    d = federated_site_update(model, x, m, lr=0.01, local_steps=3, optimizer="adam")
    s = simulate_update(model, params, x, _onehot(m), local_steps=3, local_lr=0.01, local_optimizer="adam")
    for n in params:
        torch.testing.assert_close(d[n], s[n].detach(), rtol=1e-4, atol=1e-7)
    # Adam's first step is about -lr * sign(g): a one-step Adam update is not -lr * gradient.
    d1 = simulate_update(model, params, x, _onehot(m), local_lr=0.01, local_optimizer="adam", create_graph=False)
    g = simulate_update(model, params, x, _onehot(m), create_graph=False)
    n = "c1.weight"
    big = g[n].abs() > 1e-4  # where |g| is near Adam's eps the step is smaller than lr
    torch.testing.assert_close(d1[n][big], -0.01 * torch.sign(g[n][big]), rtol=1e-3, atol=1e-6)


def test_inverse_norm_layer_weights_equalise_layers():
    from fastdp.attacks.inversion import _resolve_layer_weights

    t = [torch.full((4,), 3.0), torch.full((1,), 0.5)]
    w = _resolve_layer_weights("inverse_norm", ["a", "b"], t)
    assert w["a"] == pytest.approx(1 / 6) and w["b"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        _resolve_layer_weights("nope", ["a", "b"], t)
