"""Small data and models shared by the federated tests."""

import functools

from fastdp.data import PhantomDataset
from fastdp.models import UNet

SIZE = 64
tiny_unet = functools.partial(UNet, 1, 2, base_channels=4, depth=2)


@functools.cache
def phantom(site: str, n: int, start: int = 0) -> PhantomDataset:
    ds = PhantomDataset(site, n, SIZE, seed=0, start=start)
    ds.tensors()  # render once, shared by the tests
    return ds
