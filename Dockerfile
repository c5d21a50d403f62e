# The merbridge-py node agent: Debian 12 with Debian's bcc, and the agent in a
# virtualenv that sees it. Build from the repository root with `make image`
# (podman, no Docker daemon, no registry: scripts/build-image.sh makes the base
# from Debian packages), or where Docker is at hand:
#   docker build -t registry.example.com/merbridge-py:0.1.0 .
# then: merbridge-py manifests --image registry.example.com/merbridge-py:0.1.0 | kubectl apply -f -
FROM debian:bookworm-slim

# python3-bpfcc: bcc and LLVM for /usr/bin/python3 (the PyPI package named
#   "bcc" is an unrelated library, so bcc can only come from here).
# python3-venv: the virtualenv and its bundled pip (python3-pip is not needed).
# iproute2: `ip` for inspecting pod namespaces from `kubectl exec`.
# iptables (iptables-nft-save, iptables-legacy-save) and nftables (nft): the
#   agent reads the rules Istio installed in each pod's namespace with them
#   (through nsenter, from util-linux, which minbase already has) and decides
#   from those rules.
# ca-certificates: TLS to the package index while building.
#
# Kernel headers: bcc compiles against headers at run time. The DaemonSet
# mounts the host's /lib/modules and /usr/src, which hold the running kernel's
# own headers where the distribution installs them; they shadow this image's
# /usr/src. As a fallback for nodes without headers, the image carries
# Debian's current kernel headers under /opt/kernel-headers (our programs only
# use UAPI structs, which a different kernel version's headers describe the
# same way). Only the header files are unpacked: the package's dependencies
# (gcc, kbuild) exist to build modules, which we never do. The -common package
# carries every architecture's arch/ tree; only this one's is kept (-19 MB).
# apt's package cache and lists are removed in the same layer (-140 MB).
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends python3-bpfcc python3-venv iproute2 iptables nftables ca-certificates; \
    arch="$(dpkg --print-architecture)"; \
    case "$arch" in amd64) srcarch=x86 ;; *) srcarch="$arch" ;; esac; \
    headers="$(apt-cache depends "linux-headers-$arch" | sed -n 's/^ *Depends: //p' | head -n1)"; \
    mkdir /tmp/headers; \
    cd /tmp/headers; \
    apt-get download "$headers" "${headers%-$arch}-common"; \
    for deb in ./*.deb; do dpkg -x "$deb" ./root; done; \
    find ./root/usr/src/linux-headers-*-common/arch -mindepth 1 -maxdepth 1 ! -name "$srcarch" -exec rm -rf {} +; \
    test -d ./root/usr/src/linux-headers-*-common/arch/"$srcarch"; \
    mkdir -p /opt/kernel-headers; \
    mv ./root/usr/src/linux-headers-* /opt/kernel-headers/; \
    cd /; \
    apt-get clean; \
    rm -rf /tmp/headers /var/lib/apt/lists/* /var/cache/apt/*

# MERBRIDGE_EBPF_DIR: the eBPF sources are not part of the Python package.
# MERBRIDGE_KERNEL_HEADERS_FALLBACK: where the header finder looks after the
# host's /lib/modules/$(uname -r)/{build,source} and /usr/src.
ENV MERBRIDGE_EBPF_DIR=/opt/merbridge-py/ebpf \
    MERBRIDGE_KERNEL_HEADERS_FALLBACK=/opt/kernel-headers \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Only what the package needs, so that editing tests or docs does not rebuild this layer.
COPY setup.cfg pyproject.toml /opt/merbridge-py/
COPY merbridge_py /opt/merbridge-py/merbridge_py
COPY ebpf /opt/merbridge-py/ebpf

# --system-site-packages: the venv must see Debian's bcc. The import check
# fails the build here rather than on a node. Not needed at run time, so
# removed: pip and setuptools (-25 MB) and the kubernetes client's asyncio
# variant, kubernetes.aio (-68 MB; the agent uses the synchronous client).
# The optional secret `ca` is a CA bundle for pip, for build hosts whose egress
# goes through a TLS-inspecting proxy (scripts/build-image.sh passes the
# host's bundle); it is mounted for this step only and never stored in a layer.
RUN --mount=type=secret,id=ca set -eux; \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    python3 -m venv --system-site-packages /opt/venv; \
    /opt/venv/bin/pip install --no-cache-dir /opt/merbridge-py; \
    /opt/venv/bin/pip uninstall --yes --quiet setuptools pip; \
    rm -rf /opt/venv/lib/python3*/site-packages/kubernetes/aio; \
    /opt/venv/bin/python -c 'import bcc, kubernetes.client, kubernetes.watch, merbridge_py.cli, merbridge_py.agent.kube_source'; \
    for tool in nsenter nft iptables-nft-save iptables-legacy-save; do command -v "$tool" >/dev/null; done; \
    merbridge-py --help >/dev/null

# The agent runs as root: Kubernetes grants a container's added capabilities
# (NET_ADMIN, SYS_ADMIN, SYS_PTRACE) only to uid 0, and the bpf(), setns() and
# cgroup-attach calls need them. The DaemonSet drops every other capability.
ENTRYPOINT ["merbridge-py"]
CMD ["--help"]
