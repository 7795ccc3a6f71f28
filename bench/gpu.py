"""Figure 4: GPU speed of the worker's own loader and generation on full-size models, per speed option.

    python bench/gpu.py [--models sd15 sdxl sd35m flux] [--batch 1 4] [--options ...] [--runs 3] [--steps 30]
    python bench/gpu.py --smoke [--compile] [--out FILE]          # CPU is fine: a check of the code paths only

For each model (SD 1.5 at 512x512, SDXL, SD3.5 Medium and FLUX.1-schnell at 1024x1024), speed option and batch
size it loads the baked model with `sdworker.model.load_model(Settings(...))`, so the loader itself applies the
option, makes one warm-up batch
(`--warmup-steps` steps, at the same size and batch) and then `--runs` timed batches through
`sdworker.generate.generate`, and reports the medians: seconds per image (wall time of `generate` / batch),
steps/s (`--steps` / the pipeline call's seconds, text encoding and VAE decode included), the denoising loop's
own it/s (between the first and last step callbacks, as diffusers' progress bar counts them) and the peak GPU
memory. Every speed field of `Settings` is set explicitly for each row, so the environment cannot leak one in,
and the row says whether the loaded pipeline shows the option applied. The models are the published
architectures with random fp16 weights (bench/fullsize.py), as fast as the real weights, built once into
`--cache` and reused.

Options: baseline (SDPA, nothing else), channels_last, fuse_qkv, torch_compile (mode `--compile-mode`),
vae_tiling, vae_slicing, tf32, all (channels_last + fuse_qkv + torch_compile + tf32), and xformers (ATTENTION=xformers
in place of SDPA; its row says why where xformers does not load). The memory options: quantize_int8 (QUANTIZE=int8,
torchao), layerwise_fp8 (LAYERWISE_CASTING=fp8), group_offload_block and group_offload_leaf (GROUP_OFFLOAD), and
cpu_offload (ENABLE_MODEL_CPU_OFFLOAD): each row's peak GiB against the baseline's is what it saves, its s/image
what it costs. Off a GPU the offload rows say why they are refused.

Time on one H100 (estimates, to be replaced by measured ones): building both models about 1 minute the first
time; then per option and model, with batches 1 and 4, 3 runs of 30 steps, about 20 s for SD 1.5 and 60 to 80 s
for SDXL. The default options (baseline, channels_last, fuse_qkv) take about 6 minutes for both models. The rest
of the figure, one command each, so that each stays under 10 minutes:

    python bench/gpu.py --options tf32 vae_slicing vae_tiling --out bench/results/gpu-vae.json      # ~6 min
    python bench/gpu.py --models sd15 --options torch_compile all --out bench/results/gpu-compile-sd15.json
    python bench/gpu.py --models sdxl --options torch_compile --out bench/results/gpu-compile-sdxl.json
    python bench/gpu.py --models sdxl --options all --out bench/results/gpu-all-sdxl.json

torch.compile (COMPILE_MODE `default` unless `--compile-mode` says otherwise) compiles each UNet and VAE decoder
shape: the load compiles batch 1, the warm-up of batch 4 compiles again. `--compile-mode max-autotune` also
autotunes, which takes minutes per model and batch size and runs faster. The Inductor caches live in
`--cache`/data, so a second run on the same machine compiles far faster. The JSON is written after every row,
so a run cut short keeps its rows.

Without a CUDA device, and without --smoke, it exits with status 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.fullsize import DEFAULT_CACHE, NATIVE_SIZE, describe, ensure_model  # noqa: E402

SPEED_FIELDS = ("channels_last", "fuse_qkv", "torch_compile", "vae_tiling", "vae_slicing", "tf32")
# Options that are a value of a setting other than the speed switches: xformers (ATTENTION=xformers instead of
# SDPA) and the memory options (docs/models.md, "Larger than the GPU"), what each saves and costs in s/image.
OTHER_SETTINGS: dict[str, dict[str, Any]] = {
    "xformers": {"attention": "xformers"},
    "quantize_int8": {"quantize": "int8"},
    "layerwise_fp8": {"layerwise_casting": "fp8"},
    "group_offload_block": {"group_offload": "block"},
    "group_offload_leaf": {"group_offload": "leaf"},
    "cpu_offload": {"enable_model_cpu_offload": True},
}
OPTIONS: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "channels_last": ("channels_last",),
    "fuse_qkv": ("fuse_qkv",),
    "torch_compile": ("torch_compile",),
    "vae_tiling": ("vae_tiling",),
    "vae_slicing": ("vae_slicing",),
    "tf32": ("tf32",),
    "all": ("channels_last", "fuse_qkv", "torch_compile", "tf32"),
    **dict.fromkeys(OTHER_SETTINGS, ()),
}
DEFAULT_OPTIONS = ["baseline", "channels_last", "fuse_qkv"]
SMOKE_OPTIONS = ["baseline", "channels_last", "fuse_qkv", "vae_slicing", "vae_tiling"]
PROMPT = "a lighthouse on a rocky coast at dusk, waves, dramatic clouds, detailed oil painting"
GIB = 1024**3


def _tf32_flags() -> tuple[Any, ...] | None:
    """torch's process-wide TF32 settings (None where this torch refuses to read them the legacy way)."""
    import torch

    try:
        return (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision(),
        )
    except RuntimeError:
        return None


def _restore_tf32(flags: tuple[Any, ...] | None) -> None:
    """Undo what a tf32 load set process-wide, so that the next row starts from the same settings."""
    import torch

    if flags is not None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags[0], flags[1]
        torch.set_float32_matmul_precision(flags[2])


def applied(model: Any, field: str) -> bool | None:
    """Whether the loaded pipeline shows the speed setting `field` in effect (None: not visible on this device)."""
    import torch

    pipe = model.pipes["text2img"]
    unet, vae = getattr(pipe, "unet", None) or pipe.transformer, pipe.vae  # the denoiser: a UNet or a transformer
    if field == "channels_last":
        if not hasattr(unet, "conv_in"):
            return None
        return unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    if field == "fuse_qkv":
        return any(getattr(module, "fused_projections", False) for module in unet.modules())
    if field == "torch_compile":
        return getattr(unet, "_compiled_call_impl", None) is not None or hasattr(unet, "_orig_mod")
    if field == "vae_slicing":
        return bool(getattr(vae, "use_slicing", False))
    if field == "vae_tiling":
        return bool(getattr(vae, "use_tiling", False))
    if field == "attention":
        return any("XFormers" in type(processor).__name__ for processor in unet.attn_processors.values())
    if field in ("quantize", "layerwise_casting"):  # the denoiser's linear weights held in 8 bits
        weight = next(m.weight for m in unet.modules() if isinstance(m, torch.nn.Linear))
        return "8" in type(weight).__name__ or "8" in str(weight.dtype)
    if field in ("group_offload", "enable_model_cpu_offload"):  # between calls, the weights wait in host memory
        return next(unet.parameters()).device.type == "cpu" and model.device.startswith("cuda")
    if field == "tf32":
        if not model.device.startswith("cuda"):
            return None
        flags = _tf32_flags()
        return None if flags is None else bool(flags[0]) or flags[2] != "highest"
    raise ValueError(field)


def _free(cuda: bool) -> None:
    import torch

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure_batch(model: Any, size: int, batch: int, steps: int, warmup_steps: int, runs: int) -> dict[str, Any]:
    """A warm-up and `runs` timed calls of `generate` for `batch` images of `size` x `size`; medians."""
    import torch

    from sdworker.generate import generate
    from sdworker.schema import GenerateInput

    cuda = model.device.startswith("cuda")
    request = GenerateInput(
        prompt=PROMPT,
        num_inference_steps=steps,
        width=size,
        height=size,
        seed=1,
        num_images_per_prompt=batch,
        safety_checker=False,
    )
    stamps: list[float] = []

    def on_step(step: int, total: int) -> None:
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    generate(model, request.model_copy(update={"num_inference_steps": warmup_steps}))
    walls, inference, loop_rates, peaks = [], [], [], []
    for _ in range(runs):
        stamps.clear()
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = generate(model, request, on_step=on_step)
        walls.append(time.perf_counter() - started)
        inference.append(result.timings["inference"] / 1000)
        if len(stamps) > 1:
            loop_rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        if cuda:  # generate resets the peak before its pipeline call: this is the call's own peak
            peaks.append(torch.cuda.max_memory_allocated() / GIB)
    wall, seconds = statistics.median(walls), statistics.median(inference)
    return {
        "batch": batch,
        "s_per_image": round(wall / batch, 4),
        "wall_s": round(wall, 4),
        "inference_s": round(seconds, 4),
        "steps_per_s": round(steps / seconds, 3),
        "images_per_s": round(batch / wall, 3),
        "loop_it_per_s": round(statistics.median(loop_rates), 3) if loop_rates else None,
        "peak_gib": round(max(peaks), 3) if peaks else None,
        "runs_wall_s": [round(w, 4) for w in walls],
    }


def run_option(name: str, model_dir: Path, option: str, size: int, args: argparse.Namespace, report_row: Any) -> None:
    """Load `model_dir` with `option`, measure every batch size, report each row, and free the GPU."""
    import torch

    from sdworker.config import Settings
    from sdworker.errors import WorkerError
    from sdworker.model import load_model

    cuda = torch.cuda.is_available()
    base = {"model": name, "size": size, "option": option}
    wanted = OPTIONS[option]
    unknown = [field for field in wanted if field not in Settings.model_fields]
    if unknown:  # Settings ignores unknown fields: the row would silently be the baseline
        report_row({**base, "skipped": f"Settings has no field {', '.join(unknown)}"})
        return
    fields: dict[str, Any] = {field: field in wanted for field in SPEED_FIELDS}
    fields.update({"attention": "sdpa", **OTHER_SETTINGS.get(option, {})})
    settings = Settings(
        model_dir=model_dir,
        compile_mode=args.compile_mode,
        max_batch=1,
        max_images=max(args.batch),
        data_dir=args.cache / "data",
        **fields,
    )
    flags = _tf32_flags()
    _free(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = None
    try:
        started = time.perf_counter()
        try:
            model = load_model(settings)
        except Exception as err:
            report_row({**base, "skipped": f"load_model raised {type(err).__name__}: {err}"[:300]})
            return
        load_s = time.perf_counter() - started
        shown = {field: applied(model, field) for field in (*wanted, *OTHER_SETTINGS.get(option, {}))}
        resident = torch.cuda.memory_allocated() / GIB if cuda else None
        for batch in args.batch:
            row: dict[str, Any] = {**base, "batch": batch, "load_s": round(load_s, 2), "applied": shown}
            if resident is not None:
                row["weights_gib"] = round(resident, 3)
            try:
                row.update(measure_batch(model, size, batch, args.steps, args.warmup_steps, args.runs))
            except WorkerError as err:
                row["error"] = f"{err.code}: {err}"[:300]
            except Exception as err:  # carry on with the other rows
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            report_row(row)
    finally:
        del model
        if "torch_compile" in wanted:
            torch.compiler.reset()
        _restore_tf32(flags)
        _free(cuda)


def _format_row(row: dict[str, Any]) -> str:
    def num(key: str, fmt: str) -> str:
        value = row.get(key)
        return format(value, fmt) if value is not None else "-"

    note = row.get("skipped") or row.get("error") or ""
    not_applied = [field for field, shown in (row.get("applied") or {}).items() if shown is False]
    if not_applied:
        note = f"NOT APPLIED by load_model: {', '.join(not_applied)} {note}".strip()
    return (
        f"{row['model']:<6}{row['size']:>6} {row['option']:<15}{row.get('batch', '-')!s:>6}"
        f"{num('s_per_image', '.3f'):>10}{num('steps_per_s', '.2f'):>9}{num('loop_it_per_s', '.2f'):>11}"
        f"{num('peak_gib', '.2f'):>9}{num('load_s', '.1f'):>8}  {note}"
    )


HEADER = (
    f"{'model':<6}{'size':>6} {'option':<15}{'batch':>6}{'s/image':>10}{'steps/s':>9}{'loop it/s':>11}"
    f"{'peak GiB':>9}{'load s':>8}  note"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(NATIVE_SIZE), help="default: sd15 sdxl")
    parser.add_argument("--options", nargs="+", choices=list(OPTIONS), help=f"default: {' '.join(DEFAULT_OPTIONS)}")
    parser.add_argument("--batch", nargs="+", type=int, help="batch sizes (default: 1 4)")
    parser.add_argument("--runs", type=int, help="timed runs per row after the warm-up (default: 3)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: 30)")
    parser.add_argument("--warmup-steps", type=int, help="steps of the warm-up batch (default: 3)")
    parser.add_argument("--size", type=int, help="image side in pixels (default: each model's native size)")
    parser.add_argument("--compile-mode", help="torch.compile mode (default: the Settings default)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the built models are kept")
    parser.add_argument(
        "--model-dir",
        action="append",
        default=[],
        metavar="MODEL=DIR",
        help="use this baked pipeline for MODEL instead of building one (real weights, say)",
    )
    parser.add_argument("--rebuild", action="store_true", help="build the models again even when cached")
    parser.add_argument("--drop-after", action="store_true", help="delete each built model after its rows (disk)")
    parser.add_argument("--smoke", action="store_true", help="sd15 at 64x64, 2 steps, batch 1 and 2: a CPU check")
    parser.add_argument("--compile", action="store_true", help="with --smoke, add torch_compile")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args()

    import diffusers
    import torch
    import transformers

    from sdworker.config import Settings

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no GPU: this figure needs a CUDA device (--smoke checks the code paths on a CPU)", file=sys.stderr)
        sys.exit(2)
    if args.smoke:
        options = args.options or [*SMOKE_OPTIONS, *(["torch_compile"] if args.compile else [])]
        defaults = {"models": ["sd15"], "batch": [1, 2], "runs": 1, "steps": 2, "warmup_steps": 1, "size": 64}
    else:
        options = args.options or DEFAULT_OPTIONS
        defaults = {"models": ["sd15", "sdxl"], "batch": [1, 4], "runs": 3, "steps": 30, "warmup_steps": 3}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.compile_mode = args.compile_mode or Settings.model_fields["compile_mode"].default
    args.warmup_steps = min(args.warmup_steps, args.steps)
    given = dict(item.split("=", 1) for item in args.model_dir)

    report: dict[str, Any] = {
        "figure": 4,
        "smoke": args.smoke,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / GIB, 1) if cuda else None,
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "command": sys.argv,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "runs": args.runs,
        "batches": args.batch,
        "options": {option: list(OPTIONS[option]) for option in options},
        "compile_mode": args.compile_mode,
        "weights": "random, full-size published architectures (bench/fullsize.py), fp16 files",
        "models": {},
        "rows": [],
    }

    def save() -> None:  # whole or not at all: a run cut short keeps the rows written before
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            partial = args.out.with_name(args.out.name + ".partial")
            partial.write_text(json.dumps(report, indent=2) + "\n")
            partial.replace(args.out)

    def report_row(row: dict[str, Any]) -> None:
        report["rows"].append(row)
        print(_format_row(row), flush=True)
        save()

    where = report["gpu"] or f"CPU ({os.cpu_count()} cores, fp32)"
    print(f"figure 4 on {where}; torch {torch.__version__}, diffusers {diffusers.__version__}", flush=True)
    started = time.perf_counter()
    for name in args.models:
        if name in given:
            model_dir = Path(given[name])
            report["models"][name] = {"given": True}
        else:
            try:
                info = ensure_model(name, args.cache, rebuild=args.rebuild)
            except Exception as err:  # no room on the disk, say: the other models' rows go on
                report_row({"model": name, "size": args.size or NATIVE_SIZE[name], "option": "-", "skipped": str(err)})
                continue
            print(describe(name, info), flush=True)
            model_dir = info.pop("model_dir")
            report["models"][name] = info
        save()
        size = args.size or NATIVE_SIZE[name]
        print(HEADER, flush=True)
        for option in options:
            run_option(name, model_dir, option, size, args, report_row)
        if args.drop_after and name not in given:
            shutil.rmtree(model_dir, ignore_errors=True)
    report["total_s"] = round(time.perf_counter() - started, 1)
    save()
    print(f"done in {report['total_s']:.0f} s" + (f"; wrote {args.out}" if args.out else ""))


if __name__ == "__main__":
    main()
