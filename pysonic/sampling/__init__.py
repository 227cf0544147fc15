"""Samplers, separate from the models: ``set_timesteps(...)``, then per model call ``step(...)``.

Flow-matching ODE solvers (each update one fused ``pysonic.ops.flow_step``, classifier-free
guidance included): :class:`FlowEulerScheduler` (TangoFlux's) and :class:`FlowHeunScheduler`.
"""
from pysonic.sampling.flow_euler import FlowEulerScheduler, tangoflux_sigmas
from pysonic.sampling.flow_heun import FlowHeunScheduler

FLOW_SCHEDULERS = {"euler": FlowEulerScheduler, "heun": FlowHeunScheduler}


def flow_scheduler(name: str, **kwargs) -> FlowEulerScheduler:
    """A flow scheduler by name: "euler" or "heun"."""
    if name not in FLOW_SCHEDULERS:
        raise ValueError(f"unknown flow scheduler {name!r}; choose one of {sorted(FLOW_SCHEDULERS)}")
    return FLOW_SCHEDULERS[name](**kwargs)


__all__ = ["FLOW_SCHEDULERS", "FlowEulerScheduler", "FlowHeunScheduler", "flow_scheduler", "tangoflux_sigmas"]
