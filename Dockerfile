# GetGoodTape: one image for every actor; the command picks which one runs.
#   docker build -t getgoodtape:local .
#   docker run --rm getgoodtape:local run uploader      # coordinator | converter | uploader | verifier | gateway | all
# Configuration is GGT_* environment variables at run time (actors/runtime/settings.py); nothing secret is baked in.
# Deployment notes: docs/DEPLOY.md. Needs BuildKit (Docker's default builder since 23.0) for COPY --chmod.

FROM python:3.12.13-slim-trixie AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/ggt

WORKDIR /src
# The locked dependency set with its hashes (scripts/lock regenerates it; bump yt-dlp there,
# with `scripts/lock --upgrade-package yt-dlp`): no moto, no test tools. It carries yt-dlp[default]
# (yt-dlp-ejs, the JavaScript challenge solver) and Deno from PyPI (/opt/ggt/bin/deno, on PATH),
# the same as a plain `pip install getgoodtape`.
COPY requirements/runtime.txt requirements/runtime.txt
RUN /opt/ggt/bin/pip install --no-cache-dir --require-hashes -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY actors/ actors/
COPY bus/ bus/
COPY messages/ messages/
COPY storage/ storage/
RUN /opt/ggt/bin/pip install --no-cache-dir --no-deps . \
    && /opt/ggt/bin/python -c "import yt_dlp_ejs, actors.cli" \
    && ! /opt/ggt/bin/python -c "import moto" 2>/dev/null

# ---------------------------------------------------------------------------------------------------
FROM python:3.12.13-slim-trixie AS runtime

LABEL org.opencontainers.image.title="getgoodtape" \
      org.opencontainers.image.description="Media URLs to verified files in S3-compatible storage (yt-dlp + ffmpeg over a RabbitMQ actor bus)" \
      org.opencontainers.image.licenses="MIT"

# Debian's ffmpeg (the uploader streams through it, the verifier probes with ffprobe). Versions are
# not pinned: Debian replaces them with security updates, the base image tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates ffmpeg \
    && rm -rf /var/lib/apt/lists/*

COPY --from=builder /opt/ggt /opt/ggt
COPY --chmod=0755 docker/healthcheck.py /usr/local/bin/ggt-healthcheck

# A fixed numeric UID so orchestrators can check runAsNonRoot; its home holds yt-dlp's and Deno's caches.
RUN groupadd --system --gid 10001 ggt \
    && useradd --system --uid 10001 --gid ggt --create-home --home-dir /home/ggt --shell /usr/sbin/nologin ggt

ENV PATH=/opt/ggt/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DENO_NO_UPDATE_CHECK=1 \
    GGT_HTTP_HOST=0.0.0.0

# Fail the build, not the first job, when a tool is missing or broken.
RUN ffmpeg -hide_banner -version >/dev/null \
    && ffprobe -hide_banner -version >/dev/null \
    && deno --version >/dev/null \
    && getgoodtape --help >/dev/null

USER 10001:10001
WORKDIR /home/ggt

# The gateway's HTTP port (GGT_HTTP_PORT); actors expose Prometheus metrics on GGT_METRICS_PORT when set.
EXPOSE 8080

# Gateway: /healthz; other actors: /metrics when GGT_METRICS_PORT is set; else the process is alive.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 CMD ["ggt-healthcheck"]

ENTRYPOINT ["getgoodtape"]
CMD ["run", "all"]
