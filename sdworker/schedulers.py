"""Schedulers by diffusers class name or by the A1111 / k-diffusion names users already send.

A scheduler is a small stateful object built from the baked scheduler's config, so swapping it per request
costs microseconds and never touches the weights.
"""

from __future__ import annotations

import inspect
from typing import Any

from .errors import WorkerError

# A1111 name -> diffusers class and the config it needs (diffusers' own mapping table).
A1111: dict[str, tuple[str, dict[str, Any]]] = {
    "euler a": ("EulerAncestralDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm++ 2s a": ("DPMSolverSinglestepScheduler", {}),  # diffusers has no exact 2S a; this is its nearest
    "dpm++ 2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++ 2m sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++ sde": ("DPMSolverSinglestepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "plms": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
# k-diffusion keys (seed lists, A1111's API) -> A1111 names.
K_DIFFUSION = {
    "k_euler_a": "euler a",
    "k_euler_ancestral": "euler a",
    "k_euler": "euler",
    "k_lms": "lms",
    "k_heun": "heun",
    "k_dpm_2": "dpm2",
    "k_dpm_2_a": "dpm2 a",
    "k_dpmpp_2s_a": "dpm++ 2s a",
    "dpm2s_a": "dpm++ 2s a",
    "k_dpmpp_2m": "dpm++ 2m",
    "k_dpmpp_2m_sde": "dpm++ 2m sde",
    "k_dpmpp_sde": "dpm++ sde",
}
NOT_IN_DIFFUSERS = {"dpm fast", "dpm adaptive", "k_dpm_fast", "k_dpm_ad"}
# Few-step schedulers for distilled models (LCM and TCD LoRAs or checkpoints): any noise-prediction model may use
# them, though diffusers does not list them among its schedulers' compatibles.
FEW_STEP = {
    "lcm": "LCMScheduler",
    "lcmscheduler": "LCMScheduler",
    "tcd": "TCDScheduler",
    "tcdscheduler": "TCDScheduler",
}


def _split_suffix(name: str, suffixes: tuple[str, ...]) -> tuple[str, bool]:
    for suffix in suffixes:
        if name.endswith(suffix):
            return name[: -len(suffix)], True
    return name, False


def _with_spacing(scheduler: Any, trailing: bool, name: str) -> Any:
    """The scheduler with trailing timestep spacing (SDXL Lightning and Turbo were distilled with it)."""
    if not trailing:
        return scheduler
    if "timestep_spacing" not in inspect.signature(type(scheduler).__init__).parameters:
        raise WorkerError("INVALID_SCHEDULER", f"scheduler {name!r} has no timestep spacing to set", "scheduler")
    return type(scheduler).from_config(scheduler.config, timestep_spacing="trailing")


def make_scheduler(name: str | None, baked: Any) -> tuple[Any, str]:
    """A fresh scheduler for one request, and the diffusers class name it resolved to.

    `name` is None (the baked scheduler), a diffusers class compatible with the baked one, an A1111 name
    ("DPM++ 2M Karras"), a k-diffusion key ("k_dpmpp_2m_ka") or a few-step one (LCM, TCD); any of them with
    " trailing" for trailing timestep spacing ("Euler trailing", for Lightning). Unknown names raise
    INVALID_SCHEDULER.
    """
    if not name:
        return type(baked).from_config(baked.config), type(baked).__name__
    key = " ".join(name.strip().lower().split())
    key, trailing = _split_suffix(key, (" trailing", "_trailing"))
    scheduler = _resolve(key, name, baked)
    return _with_spacing(scheduler, trailing, name), type(scheduler).__name__


def _resolve(key: str, name: str, baked: Any) -> Any:
    """The scheduler a lower-case name (without a spacing suffix) stands for, configured from the baked one."""
    import diffusers

    compatible = {cls.__name__.lower(): cls for cls in [type(baked), *baked.compatibles]}
    if key in compatible:
        return compatible[key].from_config(baked.config)
    if key in FEW_STEP:
        if "FlowMatch" in type(baked).__name__:
            raise WorkerError("INVALID_SCHEDULER", f"{FEW_STEP[key]} does not fit a flow-matching model", "scheduler")
        return getattr(diffusers, FEW_STEP[key]).from_config(baked.config)
    base, karras = _split_suffix(key, (" karras", "_ka"))
    base = K_DIFFUSION.get(base, base)
    if key in NOT_IN_DIFFUSERS or base in NOT_IN_DIFFUSERS:
        raise WorkerError("INVALID_SCHEDULER", f"scheduler {name!r} has no diffusers implementation", "scheduler")
    if base not in A1111:
        classes = ", ".join(sorted(cls.__name__ for cls in compatible.values()))
        raise WorkerError(
            "INVALID_SCHEDULER",
            f"unknown scheduler {name!r}; use a diffusers class ({classes}) "
            f"or an A1111 name ({', '.join(sorted(A1111))}, each also with ' Karras'), LCM or TCD; any of "
            "them with ' trailing' for trailing timestep spacing",
            "scheduler",
        )
    class_name, extra = A1111[base]
    cls = compatible.get(class_name.lower())
    if cls is None:
        raise WorkerError("INVALID_SCHEDULER", f"{class_name} does not fit this model's scheduler", "scheduler")
    if karras:
        if "use_karras_sigmas" not in inspect.signature(cls.__init__).parameters:
            raise WorkerError("INVALID_SCHEDULER", f"scheduler {name!r} has no Karras variant", "scheduler")
        extra = {**extra, "use_karras_sigmas": True}
    return cls.from_config(baked.config, **extra)
