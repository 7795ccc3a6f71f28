# syntax=docker/dockerfile:1
# Stable Diffusion serverless worker: PyTorch with CUDA, the model's weights baked in at build time.
#
#   docker build -t sd-worker --build-arg MODEL_ID=stabilityai/stable-diffusion-xl-base-1.0 \
#       --secret id=HF_TOKEN,env=HF_TOKEN .
#   docker run --gpus all -p 8000:8000 -e API_KEYS=your-secret-key sd-worker
#
# Without API_KEYS the server makes a key at start and prints it, so set API_KEYS on serverless platforms,
# where every cold start is a fresh container. MODE=gateway|worker with REDIS_URL scales past one machine;
# on RunPod serverless set MODE=runpod on the endpoint (see the README's RunPod section).
#
# The base is plain Python: PyPI's torch wheels carry their own CUDA runtime (cuBLAS, cuDNN, NCCL), so a
# CUDA base image would only add a second copy of those libraries. The host needs an NVIDIA driver.
FROM python:3.11.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MODEL_DIR=/models
WORKDIR /app

# 1. Dependencies: rebuilt only when requirements.txt changes.
COPY requirements.txt .
RUN pip install -r requirements.txt

# 2. Weights: rebuilt only when the model or the baking code changes. The token is a build secret: it is
#    never in an ENV, a layer or the final image.
ARG MODEL_ID
ARG MODEL_REVISION
ARG MODEL_VARIANT
COPY build_args.env download.py ./
COPY sdworker/__init__.py sdworker/config.py sdworker/errors.py sdworker/model.py sdworker/
RUN --mount=type=secret,id=HF_TOKEN,env=HF_TOKEN python download.py

# 3. Code: changes here rebuild only this layer.
COPY . .

EXPOSE 8000
CMD ["python", "-u", "app.py"]
