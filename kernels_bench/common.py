"""What the benchmarks' training steps share: the default learning rate of docs/math.md ("Optimiser"), the
reconstruction loss, the trainer's optimizer, and the profiler run that the breakdowns are read from."""

import math
import time

import torch

BETAS = (0.9, 0.999)


def lr_for(F):
    return 2e-4 / math.sqrt(F / 2**14)  # docs/math.md, "Optimiser"


def recon_loss(x, recon):
    """Mean over rows and models of the unsquared L2 norm of the reconstruction error (docs/math.md), in fp32."""
    return torch.linalg.vector_norm((x - recon).float(), dim=-1).mean()


def adam(params, lr):
    """The trainer's Adam (fused where supported, else foreach), so the step timed is the one trained."""
    from crossdiff_ext.training.loop import adam as make_adam  # here: the benchmarks import crossdiff_ext late

    return make_adam(params, lr=lr, betas=BETAS)


def describe_adam(opt):
    """The optimizer as the result files name it, e.g. Adam(betas=(0.9, 0.999), fused=True, lr=0.0002)."""
    flavour = "fused" if opt.defaults.get("fused") else "foreach"
    return f"Adam(betas={tuple(opt.defaults['betas'])}, {flavour}=True, lr={opt.defaults['lr']:.3g})"


def profile(step, device, steps):
    """torch.profiler over `steps` calls of `step` (CPU, plus CUDA on a GPU): (key averages, wall ms per
    profiled step)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    on_gpu = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if on_gpu:
            torch.cuda.synchronize(device)
        profiled_ms = (time.perf_counter() - start) * 1e3 / steps
    return prof.key_averages(), profiled_ms
