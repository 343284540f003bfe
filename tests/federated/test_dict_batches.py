"""MONAI dict batches ({"image", "label", ...}) through fastdp's Poisson loader, the Site and the PrivacyEngine."""

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _fl_helpers import phantom, tiny_unet
from monai.data import CacheDataset, MetaTensor
from monai.data import Dataset as MonaiDataset
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped
from torch import nn
from torch.utils.data import DataLoader

import fastdp
from fastdp.data import image_and_label
from fastdp.engine import DPDataLoader
from fastdp.federated import DPConfig, Site, initial_global_state
from fastdp.noise import ReproducibleNoiseWarning

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from _reference import clipped_mean, per_sample_grads  # noqa: E402


def monai_items(data, image_key="image", label_key="label"):
    """The (image [1, H, W], mask [H, W]) items of `data` as MONAI-style dicts, with extra keys."""
    return [
        {image_key: x.numpy(), label_key: y.numpy(), "name": f"slice_{i}", "index": i}
        for i, (x, y) in enumerate(data[j] for j in range(len(data)))
    ]


def monai_transform(image_key="image", label_key="label", dtype=torch.float32):
    # MONAI's layout: the label gets a channel axis too ([1, H, W]); tensors become MetaTensors.
    return Compose(
        [
            EnsureChannelFirstd(label_key, channel_dim="no_channel"),
            EnsureTyped([image_key, label_key], track_meta=True),
            EnsureTyped(image_key, dtype=dtype),
        ]
    )


def monai_phantom(n, start=0, cache=False, **keys):
    items = monai_items(phantom("site_a", n, start=start), **keys)
    if cache:
        return CacheDataset(items, monai_transform(**keys), progress=False)
    return MonaiDataset(items, monai_transform(**keys))


def test_poisson_loader_collates_monai_dicts():
    ds = monai_phantom(24)
    assert isinstance(ds[0]["image"], MetaTensor)
    loader = DPDataLoader.from_data_loader(DataLoader(ds, batch_size=6), generator=torch.Generator().manual_seed(0))
    sizes = []
    for batch in loader:
        b = len(batch["name"])
        sizes.append(b)
        assert batch["image"].shape == (b, 1, 64, 64) and batch["image"].dtype == torch.float32
        assert batch["label"].shape == (b, 1, 64, 64)
        assert batch["index"].shape == (b,)
        x, y = image_and_label(batch)
        assert type(x) is torch.Tensor and type(y) is torch.Tensor  # MetaTensor dropped, same values
        assert torch.equal(x, batch["image"].as_tensor())
    assert len(sizes) == 4 and sum(sizes) > 0


def test_empty_poisson_batch_of_monai_dicts_has_empty_tensors():
    ds = monai_phantom(8)
    loader = DPDataLoader(ds, sample_rate=1e-12, steps=2)  # every batch empty
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        assert set(batch) == {"image", "label", "name", "index"}
        assert batch["image"].shape == (0, 1, 64, 64) and batch["image"].dtype == torch.float32
        assert batch["label"].shape == (0, 1, 64, 64) and batch["label"].dtype == torch.int64
        assert batch["index"].shape == (0,) and batch["index"].dtype == torch.int64
        assert len(batch["name"]) == 0
        x, y = image_and_label(batch)
        assert x.shape == (0, 1, 64, 64) and y.shape == (0, 1, 64, 64)


def test_empty_poisson_batch_matches_default_collate_for_numpy_and_strings():
    items = [{"image": np.zeros((1, 4, 4), np.float32), "spacing": np.float64(0.8), "name": f"s{i}"} for i in range(4)]
    batch = next(iter(DPDataLoader(MonaiDataset(items), sample_rate=1e-12, steps=1)))
    assert batch["image"].shape == (0, 1, 4, 4) and batch["image"].dtype == torch.float32
    assert batch["spacing"].shape == (0,) and batch["spacing"].dtype == torch.float64
    assert batch["name"] == []


def _site(train, val, dp=None, **kw):
    kw.setdefault("batch_size", 8)
    kw.setdefault("local_steps", 2)
    return Site("site_a", train, val, tiny_unet, lr=0.1, optimizer="sgd", dp=dp, **kw)


def test_site_trains_on_monai_dicts_as_on_tuples():
    g0 = initial_global_state(tiny_unet, seed=1)
    tuples = _site(phantom("site_a", 40), phantom("site_a", 8, start=1000))
    dicts = _site(monai_phantom(40, cache=True), monai_phantom(8, start=1000))
    a, b = tuples.local_update(g0), dicts.local_update(g0)  # same seed: the same Poisson batches
    assert a.steps == b.steps == 2 and a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
    for k in a.delta:
        torch.testing.assert_close(b.delta[k], a.delta[k])
    ea, eb = tuples.evaluate(g0), dicts.evaluate(g0)
    assert ea["dice"] == pytest.approx(eb["dice"], rel=1e-6) and ea["loss"] == pytest.approx(eb["loss"], rel=1e-5)


def test_dp_site_reads_its_own_batch_keys():
    g0 = initial_global_state(tiny_unet, seed=1)
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, reproducible_noise=True)
    keys = {"image_key": "ct", "label_key": "seg"}
    with pytest.warns(ReproducibleNoiseWarning):
        tuples = _site(phantom("site_a", 40), None, dp=dp)
        dicts = _site(monai_phantom(40, **keys), None, dp=dp, batch_keys=("ct", "seg"))
    a, b = tuples.local_update(g0), dicts.local_update(g0)  # reproducible: same batches, same noise
    assert a.epsilon == pytest.approx(b.epsilon) and b.train_loss is None
    for k in a.delta:
        torch.testing.assert_close(b.delta[k], a.delta[k])
    wrong = _site(monai_phantom(40, **keys), None)  # default keys "image"/"label"
    with pytest.raises(KeyError, match="batch_keys"):
        wrong.local_update(g0)


class _TinySeg(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.GroupNorm(1, 3)
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))))


def _per_sample_ce(logits, label):
    """[B] pixel-mean cross-entropy of each sample; label [B, 1, H, W] as MONAI gives it."""
    return F.cross_entropy(logits, label[:, 0].long(), reduction="none").flatten(1).mean(1)


def test_privacy_engine_step_on_monai_metatensor_batches_is_exact(float64_default):
    n, expected_batch = 16, 4
    rng = np.random.default_rng(0)
    items = [
        {"image": rng.normal(size=(1, 8, 8)), "label": (rng.random((8, 8)) > 0.5).astype(np.int64), "name": f"s{i}"}
        for i in range(n)
    ]
    ds = MonaiDataset(items, monai_transform(dtype=torch.float64))
    model = _TinySeg()
    reference = copy.deepcopy(model)
    every = image_and_label(next(iter(DataLoader(ds, batch_size=n))))
    clip = float(torch.quantile(per_sample_grads(reference, _per_sample_ce, *every)[1], 0.25))  # clips 3 in 4
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = DataLoader(ds, batch_size=expected_batch, generator=torch.Generator().manual_seed(3))
    engine = fastdp.PrivacyEngine(seed=0)
    private, popt, ploader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0, max_grad_norm=clip
    )
    for batch in ploader:  # Poisson batches; steps until one is not empty
        popt.zero_grad()
        assert isinstance(batch["image"], MetaTensor)  # what a user's loop hands the model
        _per_sample_ce(private(batch["image"]), batch["label"]).mean().backward()
        popt.step()
        if len(batch["name"]):
            break
    x, y = image_and_label(batch)
    grads, norms = per_sample_grads(reference, _per_sample_ce, x, y)
    assert bool((norms > clip).any())  # clipping is exercised
    expected = clipped_mean(grads, norms, clip, expected_batch)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-10, atol=1e-12)
    assert engine.accountant.steps >= 1


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)
