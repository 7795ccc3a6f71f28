"""The packages the prepared GPU check brings to the GPU machine, as wheels (`make gpu-wheels`).

    python bench/gpu_wheels.py pins                   # write bench/gpu-wheels.txt from this environment's versions
    python bench/gpu_wheels.py download [--dest D]    # pip download those pins into D (default .gpu-wheels), check
    python bench/gpu_wheels.py check [--dest D]       # one wheel per pin, each for the target, within the size limit
    python bench/gpu_wheels.py install --target T --apart A     # there: pip install them into T, then preflight
    python bench/gpu_wheels.py preflight              # every requirement found, in range (install runs it)

The GPU machine has Python 3.12, torch with CUDA and its image's own packages, and no network. bench/gpu_check.sh
installs the wheels into a scratch folder on PYTHONPATH, so the worker runs the versions requirements.txt pins
(the image's transformers and huggingface-hub are other versions), except:
- torch and its own dependencies (the machine's CUDA build is what the check measures), but typing-extensions,
  which pydantic needs newer than torch does;
- FROM_IMAGE: numpy, pillow, scipy and hf-xet, 28 MB of wheels together, whose versions do not change a figure;
  a call carries at most 64 MiB in all, the repository included;
- NOT_BROUGHT: runpod, whose SDK the check never starts, and torchvision (for processors the check never loads).
Every other package of requirements.txt's closure for Python 3.12 on Linux is pinned in bench/gpu-wheels.txt
(`pins` writes it from the installed versions, which are requirements.txt's; a test keeps the two equal), and
from requirements-cuda.txt xformers and the CUDA 12 runtime library its kernels load (installed apart: APART), and
torchao for QUANTIZE.
About 54 MiB in all.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PINS = ROOT / "bench" / "gpu-wheels.txt"
DEST = ROOT / ".gpu-wheels"
LIMIT = 60 * 1024**2  # the call's 64 MiB, less the repository (about 1 MiB) and room for it to grow
PYTHON = (3, 12)
# pip matches manylinux tags exactly: name each glibc the machine's (2.35 and up) can load.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1)] + ["manylinux2014_x86_64"]
FROM_IMAGE = {"numpy", "pillow", "scipy", "hf-xet"}
# torchvision: only FLUX.2 [dev]'s and Qwen-Image-Edit's processors need it, which the check does not serve, and its
# CUDA wheel (8 MB) would not fit beside the rest.
NOT_BROUGHT = {"torch", "runpod", "torchvision"}
# From requirements-cuda.txt, for ATTENTION=xformers: its wheel (torch's stable ABI) and the CUDA 12 runtime library
# its kernels load. Both are installed apart, each in a folder of its own off PYTHONPATH: diffusers imports an
# installed xformers in every process, so that one that fails to load would fail every step; gpu_check.sh puts
# xformers on the path of its own step only, and the library on the loader's path as the image does.
# And torchao (pure Python, no dependencies) for QUANTIZE's rows, installed with the rest.
CUDA_EXTRAS = ("xformers", "nvidia-cuda-runtime-cu12", "torchao")
APART = {"xformers": "xformers", "nvidia-cuda-runtime-cu12": "cuda12"}
# Brought although torch depends on it too: pydantic and anyio need a newer one than torch does.
ALSO_BROUGHT = {"typing-extensions"}
HEADER = """\
# The packages bench/gpu_check.sh installs on the GPU machine (make gpu-wheels downloads them as wheels for
# Python 3.12, manylinux x86_64). Written by `python bench/gpu_wheels.py pins`: requirements.txt's closure at its
# versions, less torch and its own dependencies, runpod, and numpy, pillow, scipy and hf-xet (the GPU image's);
# and from requirements-cuda.txt, xformers with the CUDA 12 runtime library it loads, and torchao.
"""


def target_environment(python: tuple[int, int] = PYTHON) -> dict[str, str]:
    """The marker environment of the GPU machine, to read each package's requirements as pip would there."""
    version = f"{python[0]}.{python[1]}"
    return {
        "python_version": version,
        "python_full_version": f"{version}.3",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "extra": "",
    }


def requirements_of(requires: list[str] | None, env: dict[str, str]) -> list[Requirement]:
    """The requirements that apply in `env`, extras left out."""
    found = []
    for line in requires or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(env):
            found.append(requirement)
    return found


def closure(roots: list[str], env: dict[str, str]) -> dict[str, str]:
    """Every installed distribution `roots` need in `env`, name -> installed version."""
    found: dict[str, str] = {}
    stack = [canonicalize_name(root) for root in roots]
    while stack:
        name = stack.pop()
        if name in found:
            continue
        found[name] = metadata.version(name)
        stack += [canonicalize_name(r.name) for r in requirements_of(metadata.requires(name), env)]
    return found


def _pinned(path: Path) -> dict[str, str]:
    """A requirements file's `name==version` lines (others, such as `-r`, skipped)."""
    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith(("#", "-")):
            requirement = Requirement(line)
            pins[canonicalize_name(requirement.name)] = str(requirement.specifier).removeprefix("==")
    return pins


def project_roots() -> list[str]:
    """The names requirements.txt pins."""
    return list(_pinned(ROOT / "requirements.txt"))


def wanted_pins() -> dict[str, str]:
    """What the GPU check brings, from this environment's installed versions (requirements.txt's)."""
    env = target_environment()
    torch_side = closure(["torch"], env)
    everything = closure([name for name in project_roots() if canonicalize_name(name) not in NOT_BROUGHT], env)
    cuda = _pinned(ROOT / "requirements-cuda.txt")
    left = {*torch_side, *FROM_IMAGE, *NOT_BROUGHT} - ALSO_BROUGHT
    brought = {name: everything[name] for name in everything if name not in left}
    return dict(sorted({**brought, **{name: cuda[name] for name in CUDA_EXTRAS}}.items()))


def read_pins(path: Path = PINS) -> dict[str, str]:
    """bench/gpu-wheels.txt as name -> version."""
    return _pinned(path)


def write_pins(path: Path = PINS) -> None:
    path.write_text(HEADER + "".join(f"{name}=={version}\n" for name, version in wanted_pins().items()))


def supported_tags(python: tuple[int, int] = PYTHON) -> set[Tag]:
    return set(cpython_tags(python, platforms=PLATFORMS)) | set(compatible_tags(python, platforms=PLATFORMS))


def download(dest: Path, python: tuple[int, int] = PYTHON, pins: dict[str, str] | None = None) -> None:
    """`pip download` each pin for the target (no dependencies: they are pinned too) into an emptied `dest`."""
    pins = read_pins() if pins is None else pins
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", f"{python[0]}.{python[1]}", "--implementation", "cp", "--dest", str(dest)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run([*command, *(f"{name}=={version}" for name, version in pins.items())], check=True)


def check(dest: Path, python: tuple[int, int] = PYTHON, pins: dict[str, str] | None = None) -> list[str]:
    """What is wrong with the wheels in `dest` (nothing: an empty list); prints each wheel and the total."""
    pins = read_pins() if pins is None else pins
    tags = supported_tags(python)
    problems, seen, total = [], {}, 0
    for wheel in sorted(dest.glob("*.whl"), key=lambda path: -path.stat().st_size):
        name, version, _, wheel_tags = parse_wheel_filename(wheel.name)
        size = wheel.stat().st_size
        total += size
        print(f"{size / 1e6:8.2f} MB  {wheel.name}")
        if name in seen:
            problems.append(f"two versions of {name}: {seen[name]} and {version} (pip installs neither)")
        seen[name] = str(version)
        if name not in pins:
            problems.append(f"{wheel.name} is not pinned in {PINS.name}")
        elif Version(pins[name]) != version:
            problems.append(f"{wheel.name} is not the pinned {name}=={pins[name]}")
        if not wheel_tags & tags:
            problems.append(f"{wheel.name} does not install on CPython {python[0]}.{python[1]} manylinux x86_64")
    problems += [f"no wheel of {name}=={version}" for name, version in pins.items() if name not in seen]
    print(f"{total / 1024**2:8.2f} MiB in {len(seen)} wheels (limit {LIMIT / 1024**2:.0f} MiB)")
    if total > LIMIT:
        problems.append(f"the wheels take {total / 1024**2:.1f} MiB, over the limit of {LIMIT / 1024**2:.0f} MiB")
    return problems


def preflight(pins: dict[str, str] | None = None) -> list[str]:
    """On the GPU machine after the install: each pin is what Python finds, and every requirement of theirs is
    installed (from the wheels or the image) at a version it accepts. Prints where each package came from."""
    pins = read_pins() if pins is None else pins
    env = target_environment((sys.version_info.major, sys.version_info.minor))
    problems = []
    needed: dict[str, list[tuple[Requirement, str]]] = {}  # name -> (requirement, the pin that has it)
    for name, version in pins.items():
        if name in APART:  # off PYTHONPATH: checked by the step that uses it
            continue
        found = _installed(name)
        if found is None:
            problems.append(f"{name}=={version} is not installed")
            continue
        if found != version:
            problems.append(f"{name}: Python finds {found}, not the pinned {version} (PYTHONPATH?)")
        for requirement in requirements_of(metadata.requires(name), env):
            needed.setdefault(canonicalize_name(requirement.name), []).append((requirement, name))
    for name, wants in sorted(needed.items()):
        if name in pins:
            continue
        found = _installed(name)
        if found is None:
            problems.append(f"{name} is missing: needed by {'; '.join(f'{r} (by {by})' for r, by in wants)}")
            continue
        print(f"from the image: {name} {found} ({metadata.distribution(name).locate_file('')})")
        problems += [
            f"{name} {found} from the image does not meet {requirement} (by {by})"
            for requirement, by in wants
            if not requirement.specifier.contains(found, prereleases=True)
        ]
    return problems


def _installed(name: str) -> str | None:
    """The version of `name` Python finds, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def install(dest: Path, target: Path, apart: Path) -> int:
    """There: pip installs the wheels into an emptied `target` (each of APART into `apart`/its folder, off
    PYTHONPATH), then the preflight runs with `target` first on PYTHONPATH. Its exit status is the result."""
    import os

    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        print(f"problem: no wheels in {dest}: run `make gpu-wheels` here first and carry {dest}", file=sys.stderr)
        return 1
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile"]
    pip += ["--no-cache-dir", "--upgrade"]
    groups: dict[Path, list[Path]] = {}
    for wheel in wheels:
        folder = APART.get(parse_wheel_filename(wheel.name)[0])
        groups.setdefault(apart / folder if folder else target, []).append(wheel)
    for folder in (target, apart):
        shutil.rmtree(folder, ignore_errors=True)
    for folder, group in groups.items():
        subprocess.run([*pip, "--target", str(folder), *map(str, group)], check=True)
        print(f"installed {len(group)} wheels into {folder}", flush=True)
    # Byte-compiled once, on every core (pip compiles one file after another): without it each step's Python
    # compiles diffusers and transformers again wherever PYTHONDONTWRITEBYTECODE is set, about 3 s a process,
    # which the cold start's import time would report as the worker's.
    for folder in (target, apart):
        if folder.exists():
            subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(folder)], check=True)
    path = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, __file__, "preflight"], env={**os.environ, "PYTHONPATH": path}).returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["pins", "download", "check", "install", "preflight"])
    parser.add_argument("--dest", type=Path, default=DEST, help="the wheels' folder (default: .gpu-wheels)")
    parser.add_argument("--target", type=Path, help="install: the scratch folder for PYTHONPATH")
    parser.add_argument("--apart", type=Path, help="install: the folder for xformers and the CUDA 12 runtime")
    parser.add_argument(
        "--python-version", default="3.12", help="download for this Python instead (the CI's rehearsal)"
    )
    args = parser.parse_args()
    python = tuple(int(part) for part in args.python_version.split("."))[:2]
    if args.action == "pins":
        write_pins()
        print(f"wrote {PINS.relative_to(ROOT)}: {len(read_pins())} pins")
        return
    if args.action == "install":
        if not (args.target and args.apart):
            parser.error("install needs --target and --apart")
        sys.exit(install(args.dest, args.target, args.apart))
    if args.action == "download":
        download(args.dest, python)
    problems = preflight() if args.action == "preflight" else check(args.dest, python)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
