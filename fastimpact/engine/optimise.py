"""One level's optimisation: on the GPU where the level's term and parameterisation have device
forms, else on the host."""

from __future__ import annotations

from .device_loop import device_loop, runs_on_device
from .estimation import LevelRun
from .host_loop import host_loop

__all__ = ["optimise"]


def optimise(cost, run: LevelRun) -> dict:
    """Run one level: on the GPU when the backend is cuda and both the term and the parameterisation
    have device forms, else on the host. Emits level_end with the report and the transform."""
    loop = device_loop if runs_on_device(cost) else host_loop
    info = loop(cost, run)
    run.emit("level_end", {**info, "transform": cost.transform})
    return info
