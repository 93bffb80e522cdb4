# One image for the API and the workers (docker-compose.yml). On x86_64 the pinned torch wheel from PyPI
# carries CUDA, which the GPU worker needs; the NVIDIA driver comes from the host (NVIDIA Container Toolkit).
FROM python:3.11-slim

# git: workers record the code revision they run, and self-update / pinned code_revs use it.
RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# torch first and pinned, in its own layer: code changes do not re-download it.
RUN pip install --no-cache-dir torch==2.13.0
COPY pyproject.toml README.md ./
COPY api ./api
COPY common ./common
COPY scheduler ./scheduler
COPY worker ./worker
COPY examples ./examples
RUN pip install --no-cache-dir .

RUN useradd --create-home --uid 1000 gridfleet && mkdir /data && chown gridfleet /data
USER gridfleet
ENV GRIDFLEET_HOME=/data PYTHONUNBUFFERED=1
VOLUME /data
EXPOSE 8000
CMD ["gridfleet", "--help"]
