# pcbvlm images. One Dockerfile, two targets that run the very same steps (stage `common`) and differ only in
# the base image and the lock, i.e. in the torch build:
#
#   cuda (default target)  the job image, for one of two CUDA stacks (CUDA_STACK; README "Requirements"):
#                          13: requirements/cuda.lock, PyPI's torch 2.13.0 for CUDA 13.0, NVIDIA driver >= 580;
#                              base nvidia/cuda:13.0.2-runtime-ubuntu22.04 (the default), tag pcbvlm:cuda13
#                          12: requirements/cuda12.lock, PyPI's torch 2.10.0 for CUDA 12.8, driver >= 525;
#                              base nvidia/cuda:12.8.1-runtime-ubuntu22.04, tag pcbvlm:cuda12
#                          torch's nvidia-* wheels bring the CUDA libraries, so any Debian/Ubuntu base with Python
#                          3.11 works too (`make check-images` builds both on a debootstrapped Debian 12, offline).
#                          The host needs the NVIDIA Container Toolkit.
#   cpu                    tests and the demo: torch 2.13.0+cpu from requirements/cpu.lock on
#                          python:3.11-slim-bookworm.
#
# `make build` (the stack of the host's driver, or CUDA_STACK=12|13) / `make build-cpu` pass the right BASE_IMAGE
# and LOCK for each target. By hand:
#   docker build --target cuda -t pcbvlm:cuda13 .
#   docker build --target cuda --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04 \
#       --build-arg LOCK=requirements/cuda12.lock -t pcbvlm:cuda12 .
#   docker build --target cpu --build-arg BASE_IMAGE=python:3.11-slim-bookworm \
#       --build-arg LOCK=requirements/cpu.lock -t pcbvlm:cpu .
# (a target built with the other target's lock stops at its last step with a message saying so).
#
# Python 3.11: the base either has it (python:3.11-*) or its distribution packages it (Ubuntu 22.04 universe,
# Debian 12); Ubuntu 24.04 has no python3.11 without the deadsnakes PPA, hence the 22.04 CUDA base.
#
# Build arguments (all optional):
#   BASE_IMAGE           base image; a site without Docker Hub passes its own (a mirror, or a local image)
#   LOCK                 requirements/cuda.lock, requirements/cuda12.lock or requirements/cpu.lock
#   UID, GID             the user the image runs as (default 1000; `make build` passes yours)
#   PIP_INDEX_URL        package index or mirror, e.g. https://pypi.tuna.tsinghua.edu.cn/simple
#   PIP_EXTRA_INDEX_URL  a second index (make build-cpu: PyTorch's CPU index, where torch 2.13.0+cpu lives)
#   PIP_NO_INDEX=1       offline: only the wheelhouse, given as `--build-context wheelhouse=DIR` (make wheelhouse)
#   APT_MIRROR           Debian/Ubuntu mirror root, e.g. https://mirrors.tuna.tsinghua.edu.cn (used only when the
#                        base lacks a package below)
# Needs BuildKit (Docker >= 23, or buildx >= 0.8) for RUN --mount and --build-context. There is deliberately no
# `# syntax=` line: the builtin frontend has all this file uses, and the line would pull an image from Docker Hub.

ARG BASE_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu22.04

# The offline wheelhouse: only its README here. `--build-context wheelhouse=DIR` replaces this stage with DIR,
# so wheels are sent to the builder only when a build asks for them (.dockerignore keeps wheelhouse/* out).
FROM scratch AS wheelhouse
COPY wheelhouse/README.md /README.md

FROM ${BASE_IMAGE} AS common
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG APT_MIRROR=""

# System packages: make, a C compiler and Python's headers (triton and torch.compile build small extensions at
# run time), CA certificates, and Python 3.11 with venv where the base does not have it. Only what is missing is
# installed, so a base that has it all (the CI's debootstrapped Debian) needs no network here.
# DL3008 (pin apt versions) is ignored: the base image's tag fixes the distribution release, and pinned package
# versions disappear from the mirrors with each point release, which would break every later build.
# hadolint ignore=DL3008
RUN set -eu; \
    pkgs="make ca-certificates gcc libc6-dev"; \
    if ! python3.11 -c 'import ensurepip, os, sysconfig, venv; assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' 2>/dev/null; then \
        pkgs="$pkgs python3.11 python3.11-venv python3.11-dev"; \
    fi; \
    set --; \
    for p in $pkgs; do \
        dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || set -- "$@" "$p"; \
    done; \
    if [ "$#" -gt 0 ]; then \
        if [ -n "$APT_MIRROR" ]; then \
            find /etc/apt \( -name '*.list' -o -name '*.sources' \) -exec sed -i -E \
                -e "s#https?://(archive|security)\.ubuntu\.com/ubuntu#${APT_MIRROR%/}/ubuntu#g" \
                -e "s#https?://deb\.debian\.org/debian-security#${APT_MIRROR%/}/debian-security#g" \
                -e "s#https?://deb\.debian\.org/debian([ /]|\$)#${APT_MIRROR%/}/debian\\1#g" {} +; \
        fi; \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3.11 --version; make --version | sed -n 1p

# The user the jobs run as. Its home is world-writable so that compose's `user: UID:GID` works for any host user.
ARG UID=1000
ARG GID=1000
RUN set -eu; \
    getent group "$GID" >/dev/null || groupadd --gid "$GID" pcbvlm; \
    if getent passwd "$UID" >/dev/null; then userdel --remove "$(getent passwd "$UID" | cut -d: -f1)"; fi; \
    useradd --uid "$UID" --gid "$GID" --create-home --home-dir /home/pcbvlm --shell /bin/bash pcbvlm; \
    chmod 1777 /home/pcbvlm; \
    mkdir -p /cache/huggingface /data /checkpoints /outputs /models /workspace; \
    chown "$UID:$GID" /cache /cache/huggingface /data /checkpoints /outputs /models /workspace

# The environment: exactly the lock (--no-deps --require-hashes), in /opt/venv. pip builds deepspeed's sdist in an
# isolated environment that needs setuptools and wheel: from the index, or from the wheelhouse when offline.
ARG LOCK=requirements/cuda.lock
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_NO_INDEX=""
COPY ${LOCK} /opt/pcbvlm/requirements.lock
RUN --mount=type=bind,from=wheelhouse,target=/wheelhouse \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    set -eu; \
    [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
    [ -n "$PIP_NO_INDEX" ] || unset PIP_NO_INDEX; \
    if ls /wheelhouse/*.whl >/dev/null 2>&1; then export PIP_FIND_LINKS=/wheelhouse; fi; \
    if [ -n "${PIP_NO_INDEX:-}" ]; then index="none (offline)"; \
    else index="${PIP_INDEX_URL:-PyPI}${PIP_EXTRA_INDEX_URL:+ + $PIP_EXTRA_INDEX_URL}"; fi; \
    echo "lock: ${LOCK}; index: ${index}; wheelhouse: ${PIP_FIND_LINKS:-none}"; \
    python3.11 -m venv /opt/venv; \
    /opt/venv/bin/python -m pip install --disable-pip-version-check --no-deps --require-hashes \
        -r /opt/pcbvlm/requirements.lock

# The project, editable: a bind mount of the checkout at /workspace (compose service `job`) replaces the code.
WORKDIR /workspace
COPY --chown=${UID}:${GID} . /workspace
RUN set -eu; \
    /opt/venv/bin/python -m pip install --no-cache-dir --disable-pip-version-check --no-deps \
        --no-build-isolation -e /workspace; \
    /opt/venv/bin/pcbvlm --help >/dev/null; \
    rm -rf /workspace/lib/*.egg-info /workspace/build; \
    echo "${LOCK}" > /opt/venv/.installed

# Make inside the image uses /opt/venv and never creates .venv (see the Makefile, PCBVLM_IN_IMAGE).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    VENV=/opt/venv \
    RUNNER=local \
    PCBVLM_IN_IMAGE=1 \
    PCBVLM_LOCK=${LOCK} \
    HF_HOME=/cache/huggingface \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
USER ${UID}:${GID}
CMD ["make", "help"]

# The targets: nothing but a check that the lock matched the target.
FROM common AS cpu
LABEL org.opencontainers.image.title="pcbvlm-cpu" \
      org.opencontainers.image.description="pcbvlm tests and demo: torch 2.13.0+cpu, Python 3.11"
RUN python -c "import sys, torch; print('torch', torch.__version__); sys.exit(None if torch.version.cuda is None else 'error: the cpu target needs LOCK=requirements/cpu.lock and a CPU base (make build-cpu)')"

FROM common AS cuda
LABEL org.opencontainers.image.title="pcbvlm-cuda" \
      org.opencontainers.image.description="pcbvlm jobs: torch 2.13.0 for CUDA 13.0 (driver >= 580) or torch 2.10.0 for CUDA 12.8 (driver >= 525), Python 3.11"
# The NVIDIA Container Toolkit would refuse a driver older than the nvidia/cuda base's CUDA unless its branch is
# listed in the base's NVIDIA_REQUIRE_CUDA; the CUDA 12 stack runs on any driver >= 525 (minor-version
# compatibility), and `make preflight` checks the driver against torch.version.cuda and names the build that fits.
ENV NVIDIA_DISABLE_REQUIRE=1
RUN python -c "import sys, torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda); sys.exit(None if torch.version.cuda else 'error: the cuda target needs a CUDA lock, requirements/cuda.lock or requirements/cuda12.lock (make build)')"
