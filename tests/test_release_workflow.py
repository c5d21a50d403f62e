"""The release path: the workflow pushes the image the committed manifests
name, tagged with the package version, and lints clean."""

from __future__ import annotations

from configparser import ConfigParser
from pathlib import Path

import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from merbridge_py import __version__, manifests

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / ".github" / "workflows" / "release.yml"


def test_workflow_lints_clean():
    config = YamlLintConfig(file=str(REPO / ".yamllint"))
    problems = [f"{p.line}:{p.column} {p.message}" for p in linter.run(WORKFLOW.read_text(), config)]
    assert problems == []


def test_manifests_name_a_versioned_image_in_a_registry():
    setup = ConfigParser()
    setup.read(REPO / "setup.cfg")
    version = setup["metadata"]["version"]
    assert __version__ == version
    repository, _, tag = manifests.DEFAULT_IMAGE.rpartition(":")
    assert tag == version
    assert repository.startswith("ghcr.io/") and repository == repository.lower()
    images = {line.split("image:", 1)[1].strip() for line in (REPO / "manifests" / "all-in-one.yaml")
              .read_text().splitlines() if line.strip().startswith("image:")}
    assert images == {manifests.DEFAULT_IMAGE}


def test_workflow_builds_both_architectures_from_the_dockerfile():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    steps = workflow["jobs"]["image"]["steps"]
    (build,) = [s for s in steps if s.get("uses", "").startswith("docker/build-push-action")]
    assert build["with"]["platforms"] == "linux/amd64,linux/arm64"
    assert build["with"]["push"] is True and build["with"]["context"] == "."
    assert build["with"]["tags"] == "${{ steps.names.outputs.image }}"
    assert "manifests/all-in-one.yaml" in next(s["run"] for s in steps if s.get("id") == "names")
    assert workflow["permissions"]["packages"] == "write"
