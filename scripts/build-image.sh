#!/usr/bin/env bash
# Builds the agent's image from the repository's Dockerfile with no Docker
# daemon and no registry: the Dockerfile's base (debian:bookworm-slim) is made
# locally from Debian's packages with mmdebstrap, then podman (buildah inside)
# builds the Dockerfile on top of it. Outputs:
#   - IMAGE in podman's local storage (the name the manifests use)
#   - build/merbridge-py-VERSION.oci.tar, an OCI archive for air-gapped nodes
#
# Usage: scripts/build-image.sh IMAGE     (the Makefile passes the manifests' image)
# Cached: nothing is rebuilt when the inputs (Dockerfile, package, eBPF sources,
# this script) are unchanged; the base is rebuilt only when its recipe changes.
# Environment: MERBRIDGE_DEBIAN_MIRROR (default http://deb.debian.org/debian) and
# MERBRIDGE_DEBIAN_SECURITY_MIRROR (default: the same host's /debian-security),
# MERBRIDGE_IMAGE_REBUILD=1 to ignore the cache (a fresh base and fresh layers).
set -euo pipefail
cd "$(dirname "$0")/.."

image=${1:?usage: scripts/build-image.sh IMAGE}
version=$(sed -n 's/^version *= *//p' setup.cfg)
archive="build/merbridge-py-${version}.oci.tar"
mirror=${MERBRIDGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${MERBRIDGE_DEBIAN_SECURITY_MIRROR:-${mirror%/debian}/debian-security}

# The base stands in for debian:bookworm-slim, which `FROM` then finds in local
# storage. Same recipe as Debian's slim image: the minbase variant (essential
# packages + apt) without manuals, info pages and translations, so that every
# package the Dockerfile installs stays lean too (the dpkg path-excludes stay
# in the image's /etc/dpkg/dpkg.cfg.d/). Copyright files are kept.
base=localhost/debian:bookworm-slim
base_options=(
  --variant=minbase
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr   # as debootstrap does it; the usrmerge package would pull in perl
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
)
base_sources=(
  "deb $mirror bookworm main"
  "deb $mirror bookworm-updates main"
  "deb $security_mirror bookworm-security main"
)

# podman with explicit runc (crun refuses hybrid cgroup hosts; a fresh Debian
# picks crun for podman's "crun | runc"), ulimits within common hard limits
# (podman's defaults exceed them on some hosts), and the host's network for
# RUN steps: a bridge network would add interfaces and NAT rules to the host.
podman=(podman --runtime runc)
limits=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096)

label_of() {  # label_of IMAGE LABEL: the label's value, empty when the image is missing
  "${podman[@]}" image inspect --format "{{index .Labels \"$2\"}}" "$1" 2>/dev/null || true
}

scripts/install-system-deps.sh

recipe_hash=$(printf '%s\n' "${base_options[@]}" bookworm "${base_sources[@]}" | sha256sum | cut -c1-16)
if [ "${MERBRIDGE_IMAGE_REBUILD:-}" = 1 ] || [ "$(label_of "$base" merbridge-py.base-recipe)" != "$recipe_hash" ]; then
  echo "building the base $base from Debian packages (mmdebstrap ${base_options[*]} bookworm)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  mmdebstrap --quiet "${base_options[@]}" bookworm "$tmp/rootfs.tar" "${base_sources[@]}"
  "${podman[@]}" import --change 'CMD ["bash"]' --change "LABEL merbridge-py.base-recipe=$recipe_hash" \
    "$tmp/rootfs.tar" "$base" >/dev/null
  rm -rf "$tmp"
  trap - EXIT
fi

# Everything the image is built from; the Dockerfile copies a subset of it.
inputs_hash=$(find Dockerfile .dockerignore setup.cfg pyproject.toml merbridge_py ebpf scripts/build-image.sh \
                -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum |
              cat - <(echo "$recipe_hash $image") | sha256sum | cut -c1-16)
if [ "${MERBRIDGE_IMAGE_REBUILD:-}" != 1 ] && [ "$(label_of "$image" merbridge-py.inputs)" = "$inputs_hash" ] &&
   [ -s "$archive" ] && [ "$(cat "$archive.inputs" 2>/dev/null)" = "$inputs_hash" ]; then
  echo "$image is up to date ($archive)"
  exit 0
fi

echo "building $image"
previous=$("${podman[@]}" image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
extra=()
[ "${MERBRIDGE_IMAGE_REBUILD:-}" = 1 ] && extra+=(--no-cache)
# pip in the build trusts what this host trusts (a TLS-inspecting proxy's CA).
ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
[ -s "$ca" ] && extra+=(--secret "id=ca,src=$ca")
"${podman[@]}" build --pull=never --network host "${limits[@]}" "${extra[@]}" \
  --label "merbridge-py.inputs=$inputs_hash" --tag "$image" --file Dockerfile .

mkdir -p build
rm -f "$archive" "$archive.inputs"
"${podman[@]}" save --format oci-archive --output "$archive.tmp" "$image"
mv "$archive.tmp" "$archive"
echo "$inputs_hash" > "$archive.inputs"

# The previous build, now untagged (only ours: other images in the store are left alone).
current=$("${podman[@]}" image inspect --format '{{.Id}}' "$image")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  "${podman[@]}" rmi "$previous" >/dev/null 2>&1 || true
fi

size=$("${podman[@]}" image inspect --format '{{.Size}}' "$image")
echo "built $image: $((size / 1000000)) MB unpacked; $archive: $(($(stat -c %s "$archive") / 1000000)) MB"
