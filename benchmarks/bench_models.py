"""Model-zoo figures: training-step throughput (forward + backward) on this CPU.

For each model, images/s of a forward + backward pass at 224 px, batch 16, 1 input
channel, in train mode, measured two ways in the same run:

* ``fp32``: float32, contiguous (NCHW) tensors, the PyTorch default;
* ``bf16_cl``: ``torch.autocast("cpu", dtype=torch.bfloat16)`` with the model and the
  batch in ``torch.channels_last`` memory format, the path oneDNN runs fastest (AMX /
  AVX512-BF16 where the CPU has them);

and the ratio ``bf16_cl / fp32``. One warm-up step (oneDNN builds its kernels) then two
timed steps; a configuration is skipped once the whole benchmark passes ~45 s, so it
stays under a minute on the project's 2-core machines.

Threads: every model is measured on 1 thread (a per-core figure that a busy neighbour
barely moves), then ResNet-18 again on all cores. The machines are shared: while another
job keeps the cores busy, PyTorch's 2-thread OpenMP kernels wait on each other at every
barrier and run 2-5x *slower* than one thread; the 1-minute load average is recorded so
the all-core figure can be read in that light.
"""

from __future__ import annotations

import os
import time

import torch

BATCH = 16
SIZE = 224
TIMED_STEPS = 2
BUDGET_SECONDS = 45.0
# (model, threads): 0 = all cores (torch's default thread count)
CONFIGS = (("resnet18", 1), ("conv8", 1), ("densenet121", 1), ("resnet18", 0))


def _images_per_second(model: torch.nn.Module, x: torch.Tensor, bf16: bool, steps: int) -> float:
    target = torch.zeros(x.shape[0], 1)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss_fn(logits.float(), target).backward()

    step()  # warm-up: oneDNN primitive creation, allocator
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return x.shape[0] * steps / (time.perf_counter() - start)


def bench_train_step(context) -> dict:
    """Forward+backward images/s at 224 px, batch 16: fp32 NCHW vs bf16 autocast + channels_last."""
    from covidcxr.models import create_model

    started = time.perf_counter()
    all_cores = torch.get_num_threads()
    figures: dict = {
        "batch": BATCH,
        "size_px": SIZE,
        "all_cores_threads": all_cores,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    torch.manual_seed(0)
    try:
        for name, threads in CONFIGS:
            threads = threads or all_cores
            key = f"{name}_{threads}_thread{'s' if threads > 1 else ''}"
            if time.perf_counter() - started > BUDGET_SECONDS:
                figures[key] = {"skipped": "time budget"}
                continue
            torch.set_num_threads(threads)
            x = torch.randn(BATCH, 1, SIZE, SIZE)
            model = create_model(name, num_classes=1, in_channels=1, head="linear").train()
            fp32 = _images_per_second(model, x.contiguous(), bf16=False, steps=TIMED_STEPS)
            model = model.to(memory_format=torch.channels_last)
            fast = _images_per_second(model, x.to(memory_format=torch.channels_last), bf16=True, steps=TIMED_STEPS)
            figures[key] = {
                "fp32_images_per_s": round(fp32, 1),
                "bf16_channels_last_images_per_s": round(fast, 1),
                "speedup": round(fast / fp32, 2),
            }
    finally:
        torch.set_num_threads(all_cores)
    figures["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    return figures


BENCHMARKS = [bench_train_step]
