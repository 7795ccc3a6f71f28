"""LoRAs baked beside the model (`LORAS=name=source,...`) and chosen per request by name and scale, LoRAs named
by URL, and textual-inversion embeddings (`EMBEDDINGS=name=source,...`, used by their token in a prompt).

Each is fetched at build time into `MODEL_DIR/loras/<name>.safetensors` (or `embeddings/`; safetensors only) and
listed in that folder's `index.json`. At start every baked LoRA is loaded once as a named adapter (peft, through
diffusers) on the shared UNet or transformer and text encoders, then disabled. A request's set is switched on
just before its pipeline call and off again for a request without one: a plain request's pixels are exactly a
fresh worker's, and scale 0 is exactly the plain model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import WorkerError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.<>-]{0,63}$")


def _load_lora(pipe: Any, name: str, path: Path) -> None:
    """Load the LoRA at `path` as the adapter `name`; one that adapts no layer of this model is refused. A STAGES
    worker (seed 001's split) holds only some of the parts a LoRA adapts: it loads, as `load_lora_weights` would,
    the LoRA's layers for those it has (the UNet, or the text encoders), and none may be among them."""
    parts = {part: getattr(pipe, part, None) for part in pipe._lora_loadable_modules}
    if all(module is not None for module in parts.values()):
        pipe.load_lora_weights(str(path), adapter_name=name)
        if not any(name in names for names in pipe.get_list_adapters().values()):
            pipe.delete_adapters(name)
            raise ValueError("it adapts no layer of this model")
        return
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
    from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA

    unet = parts.get("unet")
    sgm = isinstance(pipe, StableDiffusionXLLoraLoaderMixin) and unet is not None  # SDXL's loader maps SGM keys
    state, alphas, metadata = pipe.lora_state_dict(
        str(path), return_lora_metadata=True, **({"unet_config": unet.config} if sgm else {})
    )
    if not all("lora" in key for key in state):
        raise ValueError("not a LoRA: some of its tensors are not LoRA layers")
    common = {
        "network_alphas": alphas,
        "adapter_name": name,
        "metadata": metadata,
        "_pipeline": pipe,
        "low_cpu_mem_usage": _LOW_CPU_MEM_USAGE_DEFAULT_LORA,
    }
    for part, module in parts.items():
        if module is None:
            continue
        if part == "unet":
            pipe.load_lora_into_unet(state, unet=module, **common)
        elif part.startswith("text_encoder"):
            pipe.load_lora_into_text_encoder(
                state, text_encoder=module, prefix=part, lora_scale=pipe.lora_scale, **common
            )
        else:  # the split stages are SD 1.x/2.x and SDXL's; the load refuses STAGES for the others
            raise ValueError(f"a STAGES worker cannot load a LoRA into {part}")


def _load_embedding(pipe: Any, name: str, path: Path) -> None:
    """A textual-inversion embedding under the token `name`: into both text encoders for SDXL's two-part files
    (`clip_l`, `clip_g`), else into the one text encoder."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    if {"clip_l", "clip_g"} <= state.keys() and getattr(pipe, "text_encoder_2", None) is not None:
        pipe.load_textual_inversion(
            state["clip_l"], token=name, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            state["clip_g"], token=name, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
    else:
        pipe.load_textual_inversion(str(path), token=name)


KINDS: dict[str, tuple[str, str, str, Callable[[Any, str, Path], None]]] = {
    "loras": ("LORAS", "NOT_A_LORA", "a LoRA", _load_lora),
    "embeddings": ("EMBEDDINGS", "NOT_AN_EMBEDDING", "a textual-inversion embedding", _load_embedding),
}
"""What may be baked beside a model by name: folder -> (setting, error code, what it is, how it loads)."""
INDEX = "index.json"


def baked(model_dir: Path, kind: str = "loras") -> dict[str, dict[str, Any]]:
    """The LoRAs (or embeddings) baked in `model_dir`: name -> {source, sha256, bytes}."""
    index = Path(model_dir) / kind / INDEX
    return json.loads(index.read_text()) if index.is_file() else {}


def load_baked(pipe: Any, model_dir: Path, kind: str) -> list[str]:
    """Load every baked LoRA (as a named adapter, all off) or embedding (under its token) into `pipe`; answers
    their names."""
    names = list(baked(model_dir, kind))
    for name in names:
        KINDS[kind][3](pipe, name, Path(model_dir) / kind / f"{name}.safetensors")
    if names and kind == "loras":
        pipe.disable_lora()
    return names


def apply_loras(pipe: Any, loras: list[tuple[str, float]], has_adapters: bool) -> None:
    """Switch on exactly `loras` (adapter name, scale) for the next call, or every adapter off when there are
    none. `has_adapters`: whether any adapter is loaded at all (else there is nothing to switch)."""
    if not has_adapters:
        return
    if not all(getattr(pipe, part, None) is not None for part in pipe._lora_loadable_modules):
        # A STAGES worker holds some parts only: a LoRA with no layers in them has no adapter here, and nothing to do.
        present = {name for names in pipe.get_list_adapters().values() for name in names}
        if not present:
            return
        loras = [(name, scale) for name, scale in loras if name in present]
    if not loras:
        pipe.disable_lora()
        return
    pipe.enable_lora()
    pipe.set_adapters([name for name, _ in loras], adapter_weights=[scale for _, scale in loras])


class UrlLoras:
    """LoRAs a request names by URL (ALLOW_LORA_URLS): fetched through the URL guard into DATA_DIR/lora-cache
    (LORA_CACHE_BYTES, least recently used out first), loaded as adapters when first used and held up to
    MAX_LOADED_LORAS (least recently used deleted first)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def adapter_name(url: str) -> str:
        """The adapter name of a URL's LoRA: the same URL is the same adapter."""
        return "url-" + hashlib.sha256(url.encode()).hexdigest()[:16]

    def fetch(self, url: str, field: str, check: Callable[[], None] | None = None) -> Path:
        """The LoRA at `url` on disk, fetched once (off the model: the caller holds no model slot)."""
        folder = self.settings.private_data_dir() / "lora-cache"
        folder.mkdir(mode=0o700, exist_ok=True)
        path = folder / f"{self.adapter_name(url)}.safetensors"
        if path.exists():
            os.utime(path)  # recently used: evicted last
            return path
        from .. import urls  # here, not at the top: the image's bake layer holds no URL guard

        data = urls.fetch(
            url,
            field,
            self.settings,
            self.settings.max_lora_bytes,
            "LORA_FETCH_FAILED",
            check,
            timeout=self.settings.lora_fetch_timeout,
        )
        staged = path.with_suffix(f".{os.getpid()}-{threading.get_ident()}.part")  # two fetches never share one
        descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.replace(staged, path)
        self._evict(folder, keep=path)
        return path

    def _evict(self, folder: Path, keep: Path) -> None:
        files = sorted(folder.glob("*.safetensors"), key=lambda file: file.stat().st_mtime)
        total = sum(file.stat().st_size for file in files)
        for file in files:
            if total <= self.settings.lora_cache_bytes:
                break
            if file != keep:
                total -= file.stat().st_size
                file.unlink(missing_ok=True)

    def ensure_loaded(self, pipe: Any, name: str, path: Path, field: str, keep: set[str]) -> None:
        """Load the adapter `name` if it is not (in the model's turn), then delete the least recently used ones
        past MAX_LOADED_LORAS, never one in `keep` (the batch's own)."""
        with self._lock:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                return
            try:
                _load_lora(pipe, name, path)
            except Exception as err:
                with contextlib.suppress(Exception):
                    pipe.delete_adapters(name)
                path.unlink(missing_ok=True)
                raise WorkerError(
                    "NOT_A_LORA", f"{field}: not a LoRA of this model ({type(err).__name__})", field
                ) from None
            self.loaded[name] = None
            for old in [old for old in self.loaded if old not in keep][
                : max(0, len(self.loaded) - self.settings.max_loaded_loras)
            ]:
                pipe.delete_adapters(old)
                del self.loaded[old]
