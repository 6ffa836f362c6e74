# The CPU image compose.yaml runs: it trains the demo model, serves it and queries it (docs/serving.md).
#   docker build -t nanodeepseek .                  # or: docker compose build
#   docker build --build-arg BASE_IMAGE=my/python:3.11 ...
# The base: any image with python3 (3.10 or later) and its venv module.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
# pip options that find the CPU build of torch: PyPI's torch of the same version is the CUDA one, gigabytes more
ARG TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
# a virtual environment: official Python images and Debian's python3 (which refuses system-wide pip) alike
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY requirements.txt requirements-extra.txt requirements-nodeps.txt ./
# torch as requirements.txt pins it, in its CPU build; then the rest, and from the extras what serving needs
RUN pip install $TORCH_INDEX "torch==$(sed -n 's/^torch==//p' requirements.txt)+cpu" \
 && pip install -r requirements.txt $(grep -E '^(fastapi|uvicorn|openai)==' requirements-extra.txt) \
 && pip install --no-deps -r requirements-nodeps.txt
COPY . .
