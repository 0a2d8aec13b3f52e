"""Where a training step's time goes: torch.profiler over a few steps, grouped by crossdiff op.

Groups are the ops' inclusive times (each crossdiff op with the kernels it launches: device time on a GPU, CPU
time on the CPU), plus the optimizer step (`Optimizer.step#...` range); "other" is the profiled steps' wall time
minus the groups (the loss and its backward, elementwise ops, autograd, launch gaps and profiler overhead). The
heaviest single entries by
self time (kernels on a GPU, ops on the CPU) come with it, so a miss can be traced to one kernel.
"""

import re

import torch

from . import common

OP_NAME = re.compile(r"^crossdiff(?:_triton)?::(\w+)$")
OPTIMIZER = re.compile(r"^Optimizer\.step#")


def _times(event, on_gpu):
    """(inclusive, self) ms summed over the profiled steps."""
    if on_gpu:
        total = getattr(event, "device_time_total", None)
        own = getattr(event, "self_device_time_total", None)
        if total is None:  # torch < 2.4 names
            total, own = event.cuda_time_total, event.self_cuda_time_total
        return total / 1e3, own / 1e3
    return event.cpu_time_total / 1e3, event.self_cpu_time_total / 1e3


def profile_step(step, device, step_ms, steps=3, top=12):
    """Profile `steps` calls of `step` (already warmed up) and group the time per step.

    step_ms: the step's median timed without the profiler (recorded beside). "other" is the profiled step's wall
    time (which includes the profiler's overhead) minus the groups. Returns dict(steps, step_ms, profiled_step_ms,
    groups_ms={op: ms}, other_ms, time, top=[{name, self_ms, calls}])."""
    on_gpu = torch.device(device).type == "cuda"
    events, profiled_ms = common.profile(step, device, steps)
    groups, heaviest = {}, []
    for event in events:
        total, own = _times(event, on_gpu)
        name = OP_NAME.match(event.key)
        if name:
            groups[name.group(1)] = groups.get(name.group(1), 0.0) + total / steps
        elif OPTIMIZER.match(event.key):
            groups["optimizer"] = groups.get("optimizer", 0.0) + total / steps
        if own > 0 and (not on_gpu or getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA):
            heaviest.append(dict(name=event.key[:120], self_ms=own / steps, calls=event.count / steps))
    heaviest.sort(key=lambda r: r["self_ms"], reverse=True)
    groups = dict(sorted(groups.items(), key=lambda kv: kv[1], reverse=True))
    return dict(
        steps=steps,
        step_ms=step_ms,
        profiled_step_ms=profiled_ms,
        groups_ms=groups,
        other_ms=profiled_ms - sum(groups.values()),
        time="device" if on_gpu else "cpu",
        top=heaviest[:top],
    )


def markdown(breakdown, title):
    """Markdown lines of one breakdown."""
    step = breakdown["profiled_step_ms"]
    share = lambda ms: f"{100 * ms / step:.0f}%" if step else ""
    lines = [
        f"## {title}",
        "",
        f"torch.profiler, {breakdown['time']} time per step over {breakdown['steps']} steps: "
        f"{step:.3f} ms per profiled step (median {breakdown['step_ms']:.3f} ms without the profiler).",
        "",
        "| part | ms | share |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {ms:.3f} | {share(ms)} |" for name, ms in breakdown["groups_ms"].items()]
    lines += [
        f"| other (loss, elementwise, autograd, gaps) | {breakdown['other_ms']:.3f} | {share(breakdown['other_ms'])} |",
        "",
        "Heaviest entries by self time:",
        "",
        "| entry | self ms | calls |",
        "|---|---:|---:|",
    ]
    lines += [f"| `{r['name']}` | {r['self_ms']:.3f} | {r['calls']:g} |" for r in breakdown["top"]]
    return lines
