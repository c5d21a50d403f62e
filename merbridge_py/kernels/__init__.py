"""The kernel matrix (`merbridge-py test-kernels`, `make test-kernels`): Debian's
own kernels booted under QEMU's software emulation, each running a chosen set
of the project's tests against the host's root filesystem (read-only, with a
tmpfs overlay). Nothing is installed on the host: the kernel packages are
downloaded and unpacked into a cache directory.

packages.py  which Debian kernel packages, downloading and unpacking them
initramfs.py the guest's init: 9p root, overlay, the mounts the tests need
vm.py        boot one kernel, run one command, read its exit status
matrix.py    what each kernel runs (a plain list), the table and JSON report
"""
