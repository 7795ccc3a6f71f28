"""torchvision beside a CPU build of torch, for the families whose processors need it (FLUX.2 [dev]'s Pixtral
processor, Qwen-Image-Edit's Qwen2-VL one).

PyPI's Linux wheels of torchvision are CUDA builds. Beside torch's CUDA build (the Docker image, a GPU machine, a
plain `pip install`) they load as they are. Beside torch's CPU build (a machine that installs it from a local file
or the CPU index, as this project's CI machine does) their compiled ops cannot load, and `import torchvision` then
fails at the two fake-op registrations it makes whatever loaded (`torchvision::nms`, `torchvision::qnms`: "operator
does not exist"). Its Python code, all the processors use, runs without the compiled ops.

This hook defines those two op schemas just before torchvision is first imported, and nothing else: the compiled
ops stay absent (calling one raises, as it would without them), and a process that never imports torchvision never
imports torch for it.

    python tools/torchvision_on_cpu_torch.py    # with the virtualenv's Python: installs the hook into its
                                                # site-packages if, and only if, torchvision fails to import there

`make run` and `make test` call it after installing requirements.txt; it answers in one line what it found.
"""

from __future__ import annotations

import importlib.abc
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

NAME = "torchvision_on_cpu_torch"
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # kept alive: torch drops a library's definitions when the object goes


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """On the first import of torchvision: define its unconditionally registered ops where nothing has, then step
    aside for the normal import."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        global _library
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        _library = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _SCHEMAS:
            try:
                torch._C._dispatch_find_schema_or_throw(f"torchvision::{schema.split('(')[0]}", "")
            except RuntimeError:  # not defined: torchvision's own ops did not load
                _library.define(schema)
        return None


def activate() -> None:
    """Called by the .pth file at every start of the virtualenv's Python."""
    sys.meta_path.insert(0, _BeforeTorchvision())


def _imports(python: str) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", "import torchvision"], capture_output=True, text=True)


def main() -> int:
    """Install the hook where torchvision is installed and fails to import for want of its compiled ops."""
    site = Path(sysconfig.get_paths()["purelib"])
    pth, module = site / f"{NAME}.pth", site / f"{NAME}.py"
    for stale in (pth, module):  # decided afresh each time: the torch or torchvision installed may have changed
        stale.unlink(missing_ok=True)
    found = _imports(sys.executable)
    if found.returncode == 0:
        print(f"{NAME}: torchvision imports as it is: no hook")
        return 0
    if "No module named 'torchvision'" in found.stderr:
        print(f"{NAME}: torchvision is not installed: no hook")
        return 0
    if "torchvision::nms" not in found.stderr:
        print(f"{NAME}: torchvision fails to import for another reason:\n{found.stderr[-2000:]}", file=sys.stderr)
        return 1
    shutil.copyfile(__file__, module)
    pth.write_text(f"import {NAME}; {NAME}.activate()\n")
    after = _imports(sys.executable)
    if after.returncode != 0:
        pth.unlink()
        module.unlink()
        print(f"{NAME}: the hook did not help:\n{after.stderr[-2000:]}", file=sys.stderr)
        return 1
    print(f"{NAME}: torchvision's compiled ops do not load beside this torch; its Python code now imports ({pth})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
