#!/usr/bin/env bash
# Installs the Debian packages merbridge-py, its test bed, tests, benchmark and demo need.
# scripts/system-programs.txt lists the programs they run with their packages; tests/test_system_programs.py
# checks that every program run is listed and every listed package is installed here. Idempotent:
# packages already present are not touched, and apt-get runs only when one is missing.
set -euo pipefail

packages=(
  python3-bpfcc      # bcc for /usr/bin/python3 (the PyPI "bcc" is an unrelated library)
  linux-headers-amd64 # kernel headers bcc compiles against when the running kernel has none
  python3-venv
  iproute2 iptables conntrack  # test bed: namespaces, Istio's own rules, conntrack flush
  bind9-dnsutils     # dig: the DNS tests' client (tests/test_dns_testbed.py)
  nftables           # Istio's native nftables rules (test bed --rules nftables, reading them back)
  haproxy            # sidecar stand-in for Envoy (honours SO_ORIGINAL_DST)
  wrk sockperf iperf3 # benchmark load generators
  procps git         # sysctl; git archive in benchmarks/agent_footprint.py (both on most machines already)
  stress-ng          # benchmark --busy: background CPU load on a node (merbridge_py/bench/busy.py)
  bpftool            # benchmarks/bpf_cost.py: our programs' run time per request
  nginx-light        # the benchmark's app (the Python test app would dominate the figures)
  nginx              # the nginx binary itself (nginx-light adds modules); tests/test_fionread_apps.py
                     # sends it large request bodies (it sizes reads with FIONREAD under edge-triggered epoll)
  openjdk-17-jre-headless  # tests/test_fionread_apps.py: a Java app sizing its reads with InputStream.available()
                           # (FIONREAD); `java Prog.java` works with the JRE alone (its module image has jdk.compiler)
  podman runc mmdebstrap  # `make image` without a Docker daemon or registry, and the container test
                          # (runc: crun, podman's default, refuses hybrid cgroup hosts)
  # `make test-kernels` (merbridge_py/kernels): boots Debian's other kernels under
  # QEMU's software emulation (this machine's /dev/kvm cannot run stock kernels),
  # with an initramfs built from busybox-static; xz-utils reads the guest's .ko.xz
  # modules' names, cpio packs the initramfs, kmod gives depmod.
  qemu-system-x86 busybox-static cpio kmod xz-utils
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "error: missing Debian packages (${missing[*]}); run as root or: apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Packages with a service (nginx) must not start it in the root namespace:
# a policy-rc.d that says "no" is Debian's way, and ours only for this install.
policy=/usr/sbin/policy-rc.d
ours=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && ours=1
fi
trap '[ -n "$ours" ] && rm -f "$policy"' EXIT
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
