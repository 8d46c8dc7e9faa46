# syntax=docker/dockerfile:1
#
# The container images of imagestream: one build target per image, built from the repository root.
#
#   docker build --target chunk-store -t chunk-store .
#   docker build --target zonal-cache -t zonal-cache .
#   docker build --target node-agent  -t node-agent  .
#   docker build --target snapshotter -t snapshotter .
#
# Naming: a service's Python package is snake_case (services/chunk_store, `python -m chunk_store`,
# its gRPC health service "chunk_store"); everything Kubernetes and Docker name is the same word in
# kebab-case: image, build target, workload, Service, `app` label (chunk-store). The node agent
# image holds the node_cache and fuse_client packages; its DaemonSet runs one container of each.
#
# An image gets the shared package (services/imagestream), its own service package(s) and protos/;
# the gRPC stubs are generated from protos/ at build time (imagestream/protogen.py, which setup.py
# runs too), never copied in.
# The Tiltfile narrows the build context to exactly these paths (docker_build only=...).

# Any Debian 12 image with python3 is a base: Docker Hub's python image by default; the cluster test
# passes a local debootstrap image (scripts/cluster/images). Commands say python3: Debian has no `python`.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- dependencies: a virtualenv of what pyproject.toml asks for, rebuilt only when it changes ----
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# pyfuse3 has no wheels: it is compiled against libfuse3 here (grpcio, cassandra-driver and
# zstandard come as manylinux wheels). Compilers and headers stay in this stage.
# On Debian's own python3 (not the python image), venv and the C headers are packages of their own.
RUN extra=$(python3 -c 'import ensurepip, sysconfig, os; \
print("" if os.path.exists(sysconfig.get_paths()["include"] + "/Python.h") else "python3-dev")' 2>/dev/null \
            || echo "python3-venv python3-dev") \
 && apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config libfuse3-dev $extra \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml ./
# /opt/build holds pip and the build tools (setuptools, grpcio-tools) and is never shipped;
# /opt/imagestream is the runtime virtualenv every image copies: no pip, no setuptools in it.
# Behind a TLS-inspecting proxy, give pip its CA bundle as the build secret `ca-certificates`
# (buildah bud --secret id=ca-certificates,src=/etc/ssl/certs/ca-certificates.crt); it stays out of the image.
RUN --mount=type=secret,id=ca-certificates \
    if [ -s /run/secrets/ca-certificates ]; then export PIP_CERT=/run/secrets/ca-certificates; fi \
 && python3 -m venv /opt/build && python3 -m venv --without-pip /opt/imagestream \
 && python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); \
open("build-requirements.txt", "w").write("\n".join(p["build-system"]["requires"])); \
open("requirements.txt", "w").write("\n".join(p["project"]["dependencies"]))' \
 && /opt/build/bin/pip install -r build-requirements.txt \
 && /opt/build/bin/pip --python /opt/imagestream/bin/python install -r requirements.txt

# --- sources: shared package and protos; each image adds its service package(s) -------------------
FROM deps AS source
COPY setup.py ./
COPY protos protos
COPY services/imagestream services/imagestream
# setup.py generates the stubs as well, but in a fresh tree it lists the packages before they exist
# and the wheel would lack imagestream.v1: generate them first.
RUN /opt/build/bin/python services/imagestream/protogen.py
# pyproject.toml names README.md as the long description; a placeholder keeps documentation edits
# out of the build context (and from rebuilding the images).
RUN echo "imagestream: see the repository's README.md" > README.md

FROM source AS build-chunk-store
COPY services/chunk_store services/chunk_store
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
 && /opt/build/bin/pip --python /opt/imagestream/bin/python install --no-deps /wheels/*.whl

FROM source AS build-zonal-cache
COPY services/zonal_cache services/zonal_cache
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
 && /opt/build/bin/pip --python /opt/imagestream/bin/python install --no-deps /wheels/*.whl

FROM source AS build-node-agent
COPY services/node_cache services/node_cache
COPY services/fuse_client services/fuse_client
COPY services/imagestream_cli services/imagestream_cli
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
 && /opt/build/bin/pip --python /opt/imagestream/bin/python install --no-deps /wheels/*.whl

FROM source AS build-snapshotter
COPY services/snapshotter services/snapshotter
COPY services/fuse_client services/fuse_client
COPY services/imagestream_cli services/imagestream_cli
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
 && /opt/build/bin/pip --python /opt/imagestream/bin/python install --no-deps /wheels/*.whl

# --- runtime: Python and the virtualenv; no compiler, no sources ----------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/imagestream/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 imagestream \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent imagestream

# The regional chunk store: gRPC on 50061, Cassandra behind it. Runs as a non-root user.
FROM runtime AS chunk-store
COPY --from=build-chunk-store /opt/imagestream /opt/imagestream
USER 10001:10001
ENV IMAGESTREAM_CHUNK_STORE_LISTEN=0.0.0.0:50061
EXPOSE 50061
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s \
  CMD ["python", "-m", "imagestream.rpc.healthcheck", "chunk_store"]
ENTRYPOINT ["python", "-m", "chunk_store"]

# The zonal cache: gRPC on 50062, Redis behind it. Runs as a non-root user.
FROM runtime AS zonal-cache
COPY --from=build-zonal-cache /opt/imagestream /opt/imagestream
USER 10001:10001
ENV IMAGESTREAM_ZONAL_CACHE_LISTEN=0.0.0.0:50062
EXPOSE 50062
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s \
  CMD ["python", "-m", "imagestream.rpc.healthcheck", "zonal_cache"]
ENTRYPOINT ["python", "-m", "zonal_cache"]

# The node agent: the node cache (gRPC on a Unix socket, no TCP port) and the FUSE client with the
# `imagestream` CLI that starts it. Root: mounting FUSE filesystems, overlayfs and runc need it
# (the DaemonSet runs the node cache itself without any capability). tini is PID 1 and reaps the
# FUSE client processes that `imagestream mount` leaves running in the background.
FROM runtime AS node-agent
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 mount tini runc \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build-node-agent /opt/imagestream /opt/imagestream
ENV IMAGESTREAM_HOME=/var/lib/imagestream \
    IMAGESTREAM_NODE_CACHE_SOCKET=/run/imagestream/node-cache.sock
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s \
  CMD ["python", "-m", "imagestream.rpc.healthcheck", "node_cache"]
ENTRYPOINT ["tini", "--"]
CMD ["python", "-m", "node_cache"]

# The containerd snapshotter (node agent): containerd's snapshots API on a Unix socket on the node,
# loaded by the node's containerd as a proxy plugin (docs/containerd.md), and the FUSE clients of the
# images it mounts. Root: FUSE, overlay and bind mounts. tini reaps the FUSE clients.
FROM runtime AS snapshotter
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 mount tini \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build-snapshotter /opt/imagestream /opt/imagestream
ENV IMAGESTREAM_HOME=/var/lib/imagestream \
    IMAGESTREAM_NODE_CACHE_SOCKET=/run/imagestream/node-cache.sock \
    IMAGESTREAM_SNAPSHOTTER_SOCKET=/run/imagestream/snapshotter.sock
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s \
  CMD ["python", "-m", "imagestream.rpc.healthcheck", "snapshotter"]
ENTRYPOINT ["tini", "--"]
CMD ["python", "-m", "snapshotter"]
