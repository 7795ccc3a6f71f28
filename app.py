"""The model's whole story: load the baked pipeline once, then generate per request.

`python app.py` serves it on HOST:PORT: direct calls, Banana's start/check, RunPod's endpoint API and Potassium's
routes (`--mode gateway|worker|potassium` for the others). To change what the worker does per request, start at
`sdworker/handler.py`; to change how the model loads, `sdworker/model/`.
"""

from potassium import Potassium, Request, Response

from sdworker import logs
from sdworker.config import Settings
from sdworker.platforms import run

# The model's code (torch, diffusers) is imported where it runs, in init and the handlers: a start that loads no
# model (a gateway, --help, a refused setting) answers without it, seconds sooner.

logs.setup()  # text at INFO until the settings are read (LOG_FORMAT)
app = Potassium("sd-worker")


@app.init
def init() -> dict:
    """Runs once at start: load the baked pipeline onto the GPU in its family's dtype (fp32 on a CPU)."""
    from sdworker.model import load_model

    return {"model": load_model(Settings())}


@app.handler("/")
def handler(context: dict, request: Request) -> Response:
    """Runs per request: txt2img, img2img or inpaint, by the inputs given."""
    from sdworker.handler import handle

    status, body = handle(context["model"], request.json)
    return Response(status=status, json=body)


@app.handler("/stages/encode")
def encode(context: dict, request: Request) -> Response:
    """Seed 001's split, stage 1: the text encoders, prompt -> embeddings (see sdworker/stages/)."""
    return stage(context, "encode", request)


@app.handler("/stages/encode_image")
def encode_image(context: dict, request: Request) -> Response:
    """Stage 1 for img2img and inpaint, on the VAE's worker: image (and mask) -> the image's latents."""
    return stage(context, "encode_image", request)


@app.handler("/stages/denoise")
def denoise(context: dict, request: Request) -> Response:
    """Stage 2: the UNet, embeddings (and image latents) -> latents."""
    return stage(context, "denoise", request)


@app.handler("/stages/decode")
def decode(context: dict, request: Request) -> Response:
    """Stage 3: the VAE, latents -> the image, as POST / answers it."""
    return stage(context, "decode", request)


def stage(context: dict, name: str, request: Request) -> Response:
    """One stage of the split (sdworker/stages/) on the loaded model."""
    from sdworker.stages import run_stage

    status, body = run_stage(context["model"], name, request.json)
    return Response(status=status, json=body)


if __name__ == "__main__":
    run(app)
