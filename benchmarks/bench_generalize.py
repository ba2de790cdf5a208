"""Generalization figures: what acquisition randomization and AdaBN cost on this CPU.

* ``acquisition_throughput``: images/s of `covidcxr.train.augment.AcquisitionRandomizer`
  at 224 px on batches of 16 phantoms — the recipe default (each transform with p = 0.5)
  and every transform at p = 1 — with the milliseconds per image of each transform alone,
  and, in the same run, the images/s of a plain fp32 ResNet-18 training step on the same
  batches, so the share of a training step the randomization adds can be read off.
* ``adabn_seconds``: seconds to re-estimate the BatchNorm statistics of a ResNet-18 at
  224 px on 64 images (`covidcxr.adapt.adabn`), against one plain inference pass over the
  same images.

One thread (the project's 2 cores are shared); the 1-minute load average is recorded.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

SIZE = 224
BATCH = 16
THREADS = 1


def _phantoms(n: int) -> torch.Tensor:
    from covidcxr.data.synth import DEFAULT_SITES, render_phantom

    images = [render_phantom(np.random.default_rng(i), SIZE, "covid", DEFAULT_SITES[i % 3])[0] for i in range(n)]
    return torch.as_tensor(np.stack(images)[:, None], dtype=torch.float32)


def _rate(fn, n_images: int, repeats: int = 3) -> float:  # noqa: ANN001
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return n_images * repeats / (time.perf_counter() - start)


def bench_acquisition_throughput(context) -> dict:  # noqa: ANN001
    """Acquisition randomization images/s at 224 px vs a plain fp32 ResNet-18 training step."""
    from covidcxr.models import create_model
    from covidcxr.train.augment import AcquisitionRandomizer
    from covidcxr.train.recipe import AcquisitionSection

    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        load_before = os.getloadavg()[0]
        batch = _phantoms(BATCH)
        default = AcquisitionRandomizer(AcquisitionSection())
        every = AcquisitionRandomizer(AcquisitionSection(prob=1.0, equalize=1.0))
        seeds = iter(range(10_000))
        per_transform = {}
        for transform in every.transforms:
            image = batch[0]

            def one(t=transform, x=image) -> None:  # noqa: ANN001
                t.set_random_state(seed=next(seeds))
                t(x)

            per_transform[type(transform).__name__] = round(1000.0 / _rate(one, 1, repeats=10), 2)
        model = create_model("resnet18", num_classes=1, head="linear").train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        targets = torch.randint(0, 2, (BATCH,)).float()

        def step() -> None:
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch)[:, 0], targets)
            loss.backward()
            optimizer.step()

        figures = {
            "size": SIZE,
            "batch": BATCH,
            "threads": THREADS,
            "randomizer_default_images_per_second": round(_rate(lambda: default(batch, seed=next(seeds)), BATCH), 1),
            "randomizer_all_on_images_per_second": round(_rate(lambda: every(batch, seed=next(seeds)), BATCH), 1),
            "ms_per_image_each_transform_p1": per_transform,
            "plain_fp32_resnet18_train_images_per_second": round(_rate(step, BATCH, repeats=2), 2),
        }
        figures["randomizer_default_share_of_a_plain_step"] = round(
            figures["plain_fp32_resnet18_train_images_per_second"] / figures["randomizer_default_images_per_second"], 3
        )
        figures["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        return figures
    finally:
        torch.set_num_threads(previous)


def bench_adabn_seconds(context) -> dict:  # noqa: ANN001
    """AdaBN on 64 images at 224 px (ResNet-18) vs one inference pass over them."""
    from covidcxr.adapt import adabn
    from covidcxr.models import create_model

    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        load_before = os.getloadavg()[0]
        images = _phantoms(64)[:, 0].numpy()
        model = create_model("resnet18", num_classes=1, head="linear").eval()

        def normalize(x: np.ndarray) -> torch.Tensor:
            return (torch.as_tensor(x)[:, None] - 0.449) / 0.226

        start = time.perf_counter()
        layers = adabn(model, images, normalize, batch_size=32)
        adabn_seconds = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(images), 32):
                model(normalize(images[i : i + 32]))
        inference_seconds = time.perf_counter() - start
        return {
            "images": len(images),
            "size": SIZE,
            "threads": THREADS,
            "batchnorm_layers": layers,
            "adabn_seconds": round(adabn_seconds, 2),
            "inference_seconds": round(inference_seconds, 2),
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
    finally:
        torch.set_num_threads(previous)


BENCHMARKS = [bench_acquisition_throughput, bench_adabn_seconds]
