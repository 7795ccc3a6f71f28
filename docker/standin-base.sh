#!/usr/bin/env bash
# Make a stand-in for the official Python base image where Docker Hub cannot be reached.
#
#   docker/standin-base.sh [TAG]        # default TAG: sd-worker-base:bookworm-py3.11
#
# Debian bookworm from Debian's mirror (debootstrap, as root), imported into Docker, with Debian's Python 3.11 in
# a virtual environment on PATH, so that `python` and `pip` behave as in python:3.11-slim (its C headers too,
# which Triton compiles against when TORCH_COMPILE is on). Then:
#
#   docker build --build-arg BASE_IMAGE=sd-worker-base:bookworm-py3.11 ...
#
# Where a proxy re-signs TLS (a company network, a sandbox), the machine's CA bundle must be trusted inside the
# build for pip to reach the package index: this base carries the bundle of the machine that made it and points
# pip and requests at it. That is a fact of the machine making the base, like a company base image; the project's
# Dockerfile assumes nothing of it. Set DEBIAN_MIRROR to use another mirror.
set -euo pipefail
docker="${DOCKER:-docker}"  # a client that builds with BuildKit (docker/image.py picks one)
tag="${1:-sd-worker-base:bookworm-py3.11}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
bundle=/etc/ssl/certs/ca-certificates.crt

if [ "$(id -u)" != 0 ]; then
  echo "standin-base.sh: debootstrap needs root" >&2
  exit 1
fi
command -v debootstrap >/dev/null || {
  echo "installing debootstrap with apt-get"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "debootstrap bookworm from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,libpython3.11-dev,ca-certificates bookworm "$work/root" "$mirror" \
  >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
rm -rf "$work"/root/var/cache/apt/archives/*.deb "$work"/root/var/lib/apt/lists/*
if [ -s "$bundle" ]; then
  cp "$bundle" "$work/root/etc/ssl/certs/machine-ca-bundle.crt"
fi
tar -C "$work/root" -c . | "$docker" import - "$tag-rootfs" >/dev/null

cat >"$work/Dockerfile" <<DOCKERFILE
FROM $tag-rootfs
RUN python3 -m venv /opt/python && /opt/python/bin/python -m pip --version
ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    LANG=C.UTF-8 \\
    PIP_CERT=/etc/ssl/certs/machine-ca-bundle.crt \\
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/machine-ca-bundle.crt \\
    SSL_CERT_FILE=/etc/ssl/certs/machine-ca-bundle.crt
CMD ["python3"]
DOCKERFILE
if [ ! -s "$bundle" ]; then  # no machine bundle: Debian's own is the one to trust
  sed -i 's|machine-ca-bundle.crt|ca-certificates.crt|' "$work/Dockerfile"
fi
DOCKER_BUILDKIT=1 "$docker" build --network host -q -t "$tag" "$work" >/dev/null
"$docker" image rm "$tag-rootfs" >/dev/null
echo "made $tag: $("$docker" run --rm --network host "$tag" python --version)"
