"""Finding kernel headers for bcc, on fake /lib/modules and /usr/src trees."""

import pytest

from merbridge_py import kheaders


def make_tree(root, files):
    for rel in files:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")


def test_running_kernels_own_build_dir_wins(tmp_path):
    make_tree(tmp_path / "modules/6.9.0/build", ["include/linux/kconfig.h", "include/generated/autoconf.h"])
    h = kheaders.find("6.9.0", modules_dir=tmp_path / "modules", src_dir=tmp_path / "src")
    assert h.path is None  # bcc's default lookup finds it


def test_debian_split_headers_are_merged(tmp_path):
    src = tmp_path / "src"
    make_tree(src / "linux-headers-6.1.0-9-amd64", ["include/generated/autoconf.h", "include/config/x", ".config"])
    make_tree(src / "linux-headers-6.1.0-9-common", ["include/linux/kconfig.h", "include/uapi/linux/bpf.h"])
    make_tree(src / "linux-headers-5.10.0-1-amd64", ["include/generated/autoconf.h"])
    make_tree(src / "linux-headers-5.10.0-1-common", ["include/linux/kconfig.h"])
    h = kheaders.find("6.18.1-custom", modules_dir=tmp_path / "none", src_dir=src, cache_dir=tmp_path / "cache")
    assert "6.1.0-9" in h.description  # the newest pair
    # one tree that has both halves, as bcc needs
    assert (h.path / "include/linux/kconfig.h").is_file()
    assert (h.path / "include/generated/autoconf.h").is_file()
    assert (h.path / "include/uapi/linux/bpf.h").is_file()
    # idempotent
    assert kheaders.find("6.18.1-custom", modules_dir=tmp_path / "none", src_dir=src,
                         cache_dir=tmp_path / "cache").path == h.path


def test_fallback_directory_is_searched_after_usr_src(tmp_path, monkeypatch):
    fallback = tmp_path / "opt"
    make_tree(fallback / "linux-headers-6.1.0-9-amd64", ["include/generated/autoconf.h"])
    make_tree(fallback / "linux-headers-6.1.0-9-common", ["include/linux/kconfig.h"])
    monkeypatch.setenv(kheaders.ENV_FALLBACK, str(fallback))
    h = kheaders.find("6.18.1", modules_dir=tmp_path / "none", src_dir=tmp_path / "empty", cache_dir=tmp_path / "c")
    assert (h.path / "include/linux/kconfig.h").is_file()


def test_no_headers_names_the_package(tmp_path, monkeypatch):
    monkeypatch.delenv(kheaders.ENV_FALLBACK, raising=False)
    with pytest.raises(kheaders.HeadersNotFound) as e:
        kheaders.find("6.18.1", modules_dir=tmp_path / "none", src_dir=tmp_path / "empty")
    assert "linux-headers-6.18.1" in str(e.value) and "linux-headers-amd64" in str(e.value)


def test_override_must_be_complete(tmp_path, monkeypatch):
    monkeypatch.setenv(kheaders.ENV_OVERRIDE, str(tmp_path))
    with pytest.raises(kheaders.HeadersNotFound, match=kheaders.ENV_OVERRIDE):
        kheaders.find("6.18.1")
