# Stable Diffusion serverless worker: PyTorch with CUDA, the model's weights baked in at build time.
#
#   docker build -t sd-worker --build-arg MODEL_ID=stabilityai/stable-diffusion-xl-base-1.0 \
#       --secret id=HF_TOKEN,src=$HOME/.cache/huggingface/token .
#   docker run --gpus all -p 8000:8000 -e API_KEYS=your-secret-key sd-worker
#
# Builds with BuildKit from Docker 20.10 on (no `# syntax` line: the engine's own Dockerfile frontend reads it,
# so nothing is fetched from Docker Hub but the base). Where Docker Hub is out of reach, build on any Debian or
# Ubuntu image with Python 3.11+ as `python` and `pip` (docker/standin-base.sh makes one):
#   --build-arg BASE_IMAGE=registry.example.com/python:3.11-slim
#
# Without API_KEYS the server makes a key at start and prints it, so set API_KEYS on serverless platforms,
# where every cold start is a fresh container. MODE=gateway|worker with REDIS_URL scales past one machine;
# on RunPod serverless set MODE=runpod on the endpoint (see docs/deploying.md's RunPod section).
#
# The base is plain Python: PyPI's torch wheels carry their own CUDA runtime (cuBLAS, cuDNN, NCCL), so a
# CUDA base image would only add a second copy of those libraries. The host needs an NVIDIA driver.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MODEL_DIR=/models
WORKDIR /app

# 1. Dependencies, and the user the worker runs as: rebuilt only when the requirements change. xformers' kernels
#    link the CUDA 12 runtime (see requirements-cuda.txt): its folder goes on the loader's path. TORCH_COMPILE
#    needs a C compiler at run time (Triton builds its CUDA launcher with it): COMPILE_TOOLS=1 installs gcc and
#    g++, about 370 MB more; without them a worker started with TORCH_COMPILE=true refuses to start and says so.
ARG COMPILE_TOOLS=0
COPY requirements.txt requirements-cuda.txt ./
# Debian's g++ is not pinned: the base image's release decides it, and a pinned version leaves the mirror.
# hadolint ignore=DL3008
RUN if [ "$COMPILE_TOOLS" = 1 ]; then \
        apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*; \
    fi \
    && pip install -r requirements-cuda.txt \
    && python -c "import nvidia.cuda_runtime as m; print(list(m.__path__)[0] + '/lib')" \
       > /etc/ld.so.conf.d/cuda12-runtime.conf && ldconfig \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin worker \
    && mkdir /app/data && chown worker /app/data

# 2. Weights: rebuilt only when the model or the baking code changes (the files below are exactly what
#    download.py needs; tests/test_image_files.py bakes with them alone). The token is a build secret, read from
#    /run/secrets/HF_TOKEN: it is in no ENV, no layer and not in the final image. The hub's own cache goes to a
#    folder removed in the same step. Docker's cache keeps this layer while the arguments stay the same, even
#    when the hub branch they name has moved: any new value of REBAKE (a date, a commit) bakes again.
ARG MODEL_ID
ARG MODEL_REVISION
ARG MODEL_VARIANT
ARG MODEL_CONFIG
ARG MODEL_SHA256
ARG ALLOW_PICKLE
ARG BAKE_DTYPE
ARG LORAS
ARG EMBEDDINGS
ARG REFINER_ID
ARG REBAKE
COPY build_args.env download.py ./
COPY sdworker/__init__.py sdworker/batching.py sdworker/config.py sdworker/errors.py sdworker/logs.py \
     sdworker/manifest.py sdworker/
COPY sdworker/model/ sdworker/model/
RUN --mount=type=secret,id=HF_TOKEN \
    HF_HOME=/tmp/hf-home python download.py && rm -rf /tmp/hf-home

# 3. Code: changes here rebuild only this layer. The weights are baked, so the hub is never asked at run time.
COPY . .
ENV HF_HUB_OFFLINE=1
USER 1000
EXPOSE 8000
CMD ["python", "-u", "app.py"]
