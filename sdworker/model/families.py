"""What differs per model family, as data: one row each. Adding a family is one row here and one recipe.

A family is found from the baked pipeline's class (model_index.json), before anything is loaded, so that its
dtype is known when the weights are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import WorkerError

if TYPE_CHECKING:
    from ..schema import GenerateInput

TASKS = ("text2img", "img2img", "inpaint", "edit")

OPTIONAL_FIELDS = ("negative_prompt", "max_sequence_length", "clip_skip", "eta", "true_cfg_scale")
"""Request fields that only some families take: a family without one refuses it by name."""


@dataclass(frozen=True)
class Family:
    """One model family: its pipelines and what a request gets when it says nothing."""

    name: str
    pipeline_classes: tuple[str, ...]  # the baked model_index.json `_class_name`s that are this family
    pipelines: dict[str, str]  # task -> diffusers pipeline class, all sharing the loaded weights
    denoiser: str  # the component that denoises: "unet" or "transformer"
    gpu_dtype: str  # DTYPE=auto on CUDA
    steps: int  # default num_inference_steps
    guidance: float  # default guidance_scale
    fields: frozenset[str]  # which of OPTIONAL_FIELDS it takes
    distilled_steps: int | None = None  # defaults of a distilled (few-step) model of this family
    distilled_guidance: float = 0.0
    distilled_config: tuple[str, Any] | None = None  # a (key, value) of the pipeline's or denoiser's config that
    # says the model is distilled (FLUX.1 schnell has no guidance embedding; FLUX.2 [klein] says is_distilled)
    sized_img2img: bool = False  # its img2img pipeline takes width and height (else it resizes to the default)
    refiner: str | None = None  # the pipeline class of a refiner baked beside it (REFINER_ID), if it can have one
    stages: bool = False  # seed 001's split (STAGES): text encoders, UNet and VAE each their own worker
    packed: int = 1  # latents packed in patches of this side before the transformer (FLUX: 2x2), beside its config's
    sequence_length: int | None = None  # the tokens its (T5 or LLM) text encoder reads by default: max_sequence_length
    max_sequence_length: int = 512  # the most it reads (T5: 512)
    guidance_kwarg: str = "guidance_scale"  # the pipeline argument a request's guidance_scale goes to
    negative_default: str | None = None  # the negative prompt when a request gives none (Qwen-Image's CFG needs one)
    config_fixes: tuple[tuple[str, dict[str, Any]], ...] = ()  # (component, config values) set at load, for
    # pipelines that read a config key the family's own model does not have
    variant_of: str | None = None  # the family whose text encoders and latents it has (an inpainting checkpoint's)
    references: int = 0  # the most reference images its edit pipeline takes
    area_sized: bool = False  # its edit pipeline sizes its output by max_area (FLUX.1 Kontext), not width x height

    @property
    def kin(self) -> str:
        """The family whose prompt rules and latent layout apply: its own name, or the one it is a variant of."""
        return self.variant_of or self.name

    def is_distilled(self, config: dict[str, Any], model_id: str) -> bool:
        """Whether the baked model is a few-step distillation: by `distilled_config` in `config` (the pipeline's
        and its denoiser's together), or by a name with turbo, lightning, lcm or schnell in it."""
        if self.distilled_steps is None:
            return False
        if self.distilled_config is not None and config.get(self.distilled_config[0]) == self.distilled_config[1]:
            return True
        return any(word in model_id.lower() for word in ("turbo", "lightning", "lcm", "schnell"))


_QWEN = Family(
    "qwenimage",
    ("QwenImagePipeline",),
    {
        "text2img": "QwenImagePipeline",
        "img2img": "QwenImageImg2ImgPipeline",
        "inpaint": "QwenImageInpaintPipeline",
    },
    "transformer",
    "bfloat16",
    50,
    4.0,
    frozenset({"negative_prompt", "max_sequence_length", "true_cfg_scale"}),
    distilled_steps=8,  # the Lightning LoRAs' merged models
    distilled_guidance=1.0,
    sized_img2img=True,
    packed=2,
    sequence_length=512,  # what its pipelines read by default; up to 1024 when a request asks
    max_sequence_length=1024,
    guidance_kwarg="true_cfg_scale",  # real classifier-free guidance, with a negative prompt
    negative_default=" ",  # Qwen-Image's own examples: without one the pipeline skips guidance
)

_SD = {"text2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline"}
FAMILIES = {
    family.name: family
    for family in (
        Family(
            "sd1",
            ("StableDiffusionPipeline",),
            {**_SD, "inpaint": "StableDiffusionInpaintPipeline"},
            "unet",
            "float16",
            50,
            7.5,
            frozenset({"negative_prompt", "clip_skip", "eta"}),
            stages=True,
        ),
        Family(
            "sd2",
            (),  # a StableDiffusionPipeline whose UNet attends to 1024-wide text embeddings
            {**_SD, "inpaint": "StableDiffusionInpaintPipeline"},
            "unet",
            "float16",
            50,
            7.5,
            frozenset({"negative_prompt", "clip_skip", "eta"}),
            stages=True,
        ),
        Family(
            "sdxl",
            ("StableDiffusionXLPipeline",),
            {
                "text2img": "StableDiffusionXLPipeline",
                "img2img": "StableDiffusionXLImg2ImgPipeline",
                "inpaint": "StableDiffusionXLInpaintPipeline",
            },
            "unet",
            "float16",
            50,
            7.5,
            frozenset({"negative_prompt", "clip_skip", "eta"}),
            distilled_steps=4,
            refiner="StableDiffusionXLImg2ImgPipeline",
            stages=True,
        ),
        Family(
            "sd3",
            ("StableDiffusion3Pipeline",),
            {
                "text2img": "StableDiffusion3Pipeline",
                "img2img": "StableDiffusion3Img2ImgPipeline",
                "inpaint": "StableDiffusion3InpaintPipeline",
            },
            "transformer",
            "bfloat16",
            28,
            7.0,
            frozenset({"negative_prompt", "max_sequence_length", "clip_skip"}),
            distilled_steps=4,
            sized_img2img=True,
            sequence_length=256,
        ),
        Family(
            "flux",
            ("FluxPipeline",),
            {"text2img": "FluxPipeline", "img2img": "FluxImg2ImgPipeline", "inpaint": "FluxInpaintPipeline"},
            "transformer",
            "bfloat16",
            28,
            3.5,
            frozenset({"max_sequence_length"}),
            distilled_steps=4,
            distilled_config=("guidance_embeds", False),
            sized_img2img=True,
            packed=2,
            sequence_length=512,
        ),
        *(
            Family(
                f"{base}-inpaint",  # an inpainting checkpoint: a 9-channel UNet (noise, mask, masked image's latents)
                (),  # a StableDiffusionInpaintPipeline; sd1 or sd2 by its UNet's text width, as the base models
                {"inpaint": "StableDiffusionInpaintPipeline"},
                "unet",
                "float16",
                50,
                7.5,
                frozenset({"negative_prompt", "clip_skip", "eta"}),
                variant_of=base,
            )
            for base in ("sd1", "sd2")
        ),
        Family(
            "sdxl-inpaint",
            ("StableDiffusionXLInpaintPipeline",),
            {"inpaint": "StableDiffusionXLInpaintPipeline"},
            "unet",
            "float16",
            50,
            7.5,
            frozenset({"negative_prompt", "clip_skip", "eta"}),
            variant_of="sdxl",
        ),
        Family(
            "flux-kontext",  # FLUX.1 Kontext [dev]: the reference image's latents join the noise as more tokens
            ("FluxKontextPipeline",),
            {"text2img": "FluxKontextPipeline", "edit": "FluxKontextPipeline", "inpaint": "FluxKontextInpaintPipeline"},
            "transformer",
            "bfloat16",
            28,
            2.5,  # its model card's and pipeline example's guidance
            frozenset({"max_sequence_length"}),
            sized_img2img=True,
            packed=2,
            sequence_length=512,
            variant_of="flux",
            references=1,
            area_sized=True,
        ),
        Family(
            "flux-fill",  # FLUX.1 Fill [dev]: the mask and the masked image's latents go in beside the noise
            ("FluxFillPipeline",),
            {"inpaint": "FluxFillPipeline"},
            "transformer",
            "bfloat16",
            50,
            30.0,  # its model card and pipeline example: 50 steps at guidance 30
            frozenset({"max_sequence_length"}),
            sized_img2img=True,
            packed=2,
            sequence_length=512,
            variant_of="flux",
        ),
        Family(
            "flux2",  # FLUX.2 [dev]: a Mistral Small 3 text encoder; guidance-distilled (a guidance embedding)
            ("Flux2Pipeline",),
            # its one pipeline draws from text alone or from reference images (edit)
            {"text2img": "Flux2Pipeline", "edit": "Flux2Pipeline"},
            "transformer",
            "bfloat16",
            50,
            2.5,  # its pipeline's example and model card: 50 steps at guidance 2.5
            frozenset({"max_sequence_length"}),
            distilled_steps=8,  # FLUX.2 [dev] Turbo (merged, known by name): 8 steps
            distilled_guidance=2.5,
            sized_img2img=True,
            packed=2,
            sequence_length=512,
            references=10,  # Black Forest Labs' FLUX.2 documentation: up to 10 reference images
        ),
        Family(
            "flux2-klein",  # FLUX.2 [klein]: a Qwen3 text encoder; [klein] 4B/9B distilled, their base models not
            ("Flux2KleinPipeline",),
            # its one pipeline draws from text alone or from reference images (edit)
            {"text2img": "Flux2KleinPipeline", "inpaint": "Flux2KleinInpaintPipeline", "edit": "Flux2KleinPipeline"},
            "transformer",
            "bfloat16",
            50,
            4.0,
            frozenset({"max_sequence_length"}),
            distilled_steps=4,
            distilled_guidance=1.0,  # not read by a distilled model: 1.0 keeps its pipeline from warning
            distilled_config=("is_distilled", True),
            sized_img2img=True,
            packed=2,
            sequence_length=512,
            references=4,  # the pipeline documents no limit: this worker's, as FLUX.2's guidance for [klein]
        ),
        _QWEN,
        *(
            # Qwen-Image-Edit (one reference) and Edit-2509/2511 (Plus: several): Qwen-Image's weights and rules.
            # No text2img: their pipelines read the size of a reference image, and fail without one. No inpaint:
            # QwenImageEditInpaintPipeline draws about a megapixel whatever width and height say.
            replace(
                _QWEN,
                name=name,
                pipeline_classes=(pipeline,),
                pipelines={"edit": pipeline},
                variant_of="qwenimage",
                references=references,  # Edit-2509's model card: one to three images work best
            )
            for name, pipeline, references in (
                ("qwenimage-edit", "QwenImageEditPipeline", 1),
                ("qwenimage-edit-plus", "QwenImageEditPlusPipeline", 3),
            )
        ),
        Family(
            "zimage",
            ("ZImagePipeline",),
            {"text2img": "ZImagePipeline", "img2img": "ZImageImg2ImgPipeline", "inpaint": "ZImageInpaintPipeline"},
            "transformer",
            "bfloat16",
            50,
            5.0,
            frozenset({"negative_prompt", "max_sequence_length"}),
            distilled_steps=8,  # Z-Image-Turbo: 8 steps without guidance (its model card and pipeline example)
            sized_img2img=True,
            packed=2,
            sequence_length=512,
        ),
        Family(
            "chroma",
            ("ChromaPipeline",),
            {"text2img": "ChromaPipeline", "img2img": "ChromaImg2ImgPipeline", "inpaint": "ChromaInpaintPipeline"},
            "transformer",
            "bfloat16",
            40,  # Chroma1-HD's model card and the pipeline's example: 40 steps at guidance 3
            3.0,
            frozenset({"negative_prompt", "max_sequence_length"}),
            sized_img2img=True,
            packed=2,
            sequence_length=512,
            # diffusers 0.42's ChromaInpaintPipeline reads guidance_embeds, which Chroma's transformer has not
            config_fixes=(("transformer", {"guidance_embeds": False}),),
        ),
    )
}
"""Pipeline classes are named rather than found through diffusers' AutoPipeline classes, whose import pulls in
every pipeline family (half a second of cold start)."""


def family_of(model_dir: Path, refiner: bool = False) -> Family:
    """The family of the pipeline baked in `model_dir`, from its model_index.json (and, for SD 1.x against
    2.x, the UNet's text-embedding width). With `refiner`, of the refiner baked there."""
    if not (Path(model_dir) / "model_index.json").is_file():
        raise WorkerError(
            "NO_MODEL", f"no baked model in {model_dir}: run `python download.py` first", "MODEL_DIR", status=500
        )
    index = json.loads((Path(model_dir) / "model_index.json").read_text())
    class_name = index.get("_class_name", "")
    refiners = {family.refiner: family for family in FAMILIES.values() if family.refiner}
    if class_name in refiners and (refiner or index.get("text_encoder", [None])[0] is None):
        if not refiner:
            raise WorkerError(
                "UNSUPPORTED_MODEL",
                f"MODEL_ID is a refiner ({class_name} without a first text encoder): bake a base model as "
                "MODEL_ID and the refiner as REFINER_ID",
                "MODEL_ID",
            )
        return refiners[class_name]
    if class_name in ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline"):
        unet = json.loads((Path(model_dir) / "unet" / "config.json").read_text())
        base = "sd2" if unet.get("cross_attention_dim") == 1024 else "sd1"
        return FAMILIES[base if class_name == "StableDiffusionPipeline" else f"{base}-inpaint"]
    for family in FAMILIES.values():
        if class_name in family.pipeline_classes:
            return family
    known = ", ".join(
        ["StableDiffusionInpaintPipeline"] + [name for family in FAMILIES.values() for name in family.pipeline_classes]
    )
    raise WorkerError(
        "UNSUPPORTED_MODEL", f"a {class_name or 'pipeline'} is not a family this worker serves ({known})", "MODEL_ID"
    )


def fit_request(request: GenerateInput, family: Family, distilled: bool, refiner: bool = False) -> GenerateInput:
    """The request with the family's defaults where it said nothing; a field the family does not take is a 422
    naming the field and the family. `refiner`: whether a refiner is baked beside the model."""
    for field in OPTIONAL_FIELDS:
        if getattr(request, field) is not None and field not in family.fields:
            raise WorkerError(
                "INVALID_INPUTS", f"{field}: the {family.name} family does not take {field}", field, status=422
            )
    length = request.max_sequence_length
    if length is not None and length > family.max_sequence_length:
        raise WorkerError(
            "INVALID_INPUTS",
            f"max_sequence_length must be at most {family.max_sequence_length} for {family.name} (got {length})",
            "max_sequence_length",
        )
    edits = "edit" in family.pipelines and "img2img" not in family.pipelines
    if edits and request.task == "img2img" and not request.pipeline:  # `image` alone: one reference image
        request = request.model_copy(update={"images": [request.image], "image": None})
    if request.task == "edit" and len(request.images or []) > family.references:
        many = f"at most {family.references}" if family.references else "no"
        plural = "image" if family.references == 1 else "images"
        message = f"images: the {family.name} family takes {many} reference {plural} (got {len(request.images or [])})"
        raise WorkerError("INVALID_INPUTS", message, "images")
    if request.task not in family.pipelines:
        # the field a request of this task lacks: text2img on an edit model, its reference images
        named = {"img2img": "image", "edit": "images", "inpaint": "mask_image"}
        wanted = named.get(request.task) or ("images" if "edit" in family.pipelines else "mask_image")
        field = "pipeline" if request.pipeline else wanted
        tasks = ", ".join(family.pipelines)
        message = f"{field}: the {family.name} family has no {request.task} pipeline (it has {tasks})"
        raise WorkerError("INVALID_INPUTS", message, field)
    guidance = request.guidance_scale
    if request.true_cfg_scale is not None:  # the pipeline's own name for what guidance_scale sets on this family
        if guidance is not None and guidance != request.true_cfg_scale:
            raise WorkerError(
                "INVALID_INPUTS",
                f"true_cfg_scale: the {family.name} family's guidance_scale is its true_cfg_scale; give one of them",
                "true_cfg_scale",
            )
        guidance = request.true_cfg_scale
    if request.refiner and not refiner:
        where = "bake one with REFINER_ID" if family.refiner else f"the {family.name} family has none"
        raise WorkerError("INVALID_INPUTS", f"refiner: this worker has no refiner ({where})", "refiner")
    if request.refiner and request.task != "text2img":
        raise WorkerError("INVALID_INPUTS", f"refiner: only text2img runs the refiner, not {request.task}", "refiner")
    if request.high_noise_frac is not None and not request.refiner:
        raise WorkerError("INVALID_INPUTS", 'high_noise_frac: only with "refiner": true', "high_noise_frac")
    steps = family.distilled_steps if distilled and family.distilled_steps else family.steps
    default_guidance = family.distilled_guidance if distilled else family.guidance
    negative = request.negative_prompt if request.negative_prompt is not None else family.negative_default
    return request.model_copy(
        update={
            "num_inference_steps": request.num_inference_steps or steps,
            "guidance_scale": default_guidance if guidance is None else guidance,
            "true_cfg_scale": None,
            "negative_prompt": negative,
            "high_noise_frac": request.high_noise_frac or (0.8 if request.refiner else None),
        }
    )
