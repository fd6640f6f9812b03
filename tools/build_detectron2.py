"""Build a Detectron2 wheel that installs and runs on today's Python packages.

Detectron2 has had no release since v0.6 (2021) and is not on PyPI under its own name. By default this
tool takes the registry's ``pb1-detectron2==0.6`` source distribution (upstream v0.6's Python sources),
applies the compatibility fixes listed in :data:`FIXES`, and builds a pure-Python wheel named
``detectron2``. Set ``DETECTRON2_SOURCE`` to a git URL, a local checkout or an sdist archive to build
from other sources instead; the same fixes apply and skip whatever is already fixed there.

The wheel is cached under ``--cache`` keyed by this file's content and the source, so a re-install
does not rebuild. Only the standard library is used: the tool runs before the project is installed::

    python tools/build_detectron2.py --python .venv/bin/python --cache .cache/detectron2
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("detectron2_build")

DEFAULT_SOURCE = "pb1-detectron2==0.6"
SOURCE_ENV = "DETECTRON2_SOURCE"

# Pure-Python needs of Detectron2's model code. Left out on purpose: black (only formats LazyConfig
# dumps), future and pydot (caffe2 export), and every compiled extension.
INSTALL_REQUIRES = [
    "Pillow>=10",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.11",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
]

SETUP_PY = '''\
"""Written by severstal's tools/build_detectron2.py: a pure-Python Detectron2 wheel (no compiled _C)."""
import glob
import os

from setuptools import find_packages, setup

PROJECTS = {{
    "detectron2.projects.point_rend": "projects/PointRend/point_rend",
    "detectron2.projects.deeplab": "projects/DeepLab/deeplab",
    "detectron2.projects.panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}}
PROJECTS = {{k: v for k, v in PROJECTS.items() if os.path.isdir(v)}}
zoo = os.path.join("detectron2", "model_zoo")
configs = [
    os.path.relpath(p, zoo)
    for p in glob.glob(os.path.join(zoo, "configs", "**", "*"), recursive=True)
    if p.endswith((".yaml", ".py"))
]

setup(
    name="detectron2",
    version="{version}",
    url="https://github.com/facebookresearch/detectron2",
    description="Detectron2, rebuilt pure-Python with compatibility fixes (severstal's tools/build_detectron2.py)",
    packages=find_packages(include=["detectron2", "detectron2.*"]) + list(PROJECTS),
    package_dir=PROJECTS,
    package_data={{"detectron2.model_zoo": configs}},
    python_requires=">=3.8",
    install_requires={requires!r},
)
'''

C_SHIM = '''\
"""Pure-Python stand-in for Detectron2's compiled extension (written by severstal's tools/build_detectron2.py).

Mask R-CNN runs on torchvision's ops and needs nothing from here. The compiled extension only holds
rotated-box ops, deformable convolution and the fast COCO evaluator; asking for any of them raises an
error that says so, instead of failing at import time.
"""

import torch


def get_compiler_version():
    return "none (pure-Python detectron2._C)"


def get_cuda_version():
    return torch.version.cuda or "none"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise NotImplementedError(
        f"detectron2._C.{name} is a compiled op that this Detectron2 build does not include "
        "(rotated boxes, deformable convolution, fast COCO evaluation). Use models without it, "
        "COCOEvaluator(..., use_fast_impl=False), or build Detectron2 with its C++/CUDA sources."
    )
'''


def _sub(path: Path, pattern: str, repl: str) -> bool:
    """Regex-replace in one file; returns whether anything changed."""
    if not path.exists():
        return False
    text = path.read_text()
    new = re.sub(pattern, repl, text)
    if new != text:
        path.write_text(new)
    return new != text


def fix_model_zoo_configs(src: Path) -> bool:
    """Put the model-zoo YAMLs inside the package (upstream keeps them in ./configs)."""
    dest = src / "detectron2" / "model_zoo" / "configs"
    if (src / "configs").is_dir() and not any(dest.rglob("*.yaml")):
        if dest.is_symlink() or dest.exists():
            dest.unlink() if dest.is_symlink() else shutil.rmtree(dest)
        shutil.copytree(src / "configs", dest)
        return True
    return False


def fix_pkg_resources(src: Path) -> bool:
    """setuptools 82 removed pkg_resources: find config files next to the module instead."""
    path = src / "detectron2" / "model_zoo" / "model_zoo.py"
    changed = _sub(path, r"import pkg_resources\n", "")
    changed |= _sub(
        path,
        r"pkg_resources\.resource_filename\(\s*\"detectron2\.model_zoo\",\s*",
        "os.path.join(os.path.dirname(__file__), ",
    )
    return changed


def fix_pillow_10(src: Path) -> bool:
    """Pillow 10 removed the ``Image.LINEAR`` alias; ``Image.BILINEAR`` is the same filter."""
    return _sub(src / "detectron2" / "data" / "transforms" / "transform.py", r"Image\.LINEAR\b", "Image.BILINEAR")


def fix_numpy_aliases(src: Path) -> bool:
    """NumPy 1.24 removed ``np.int/float/bool/str/object``; use the builtins they aliased."""
    changed = False
    for path in (src / "detectron2").rglob("*.py"):
        changed |= _sub(path, r"\bnp\.(int|float|bool|str|object)\b", r"\1")
    return changed


def fix_export_without_caffe2(src: Path) -> bool:
    """``detectron2.export`` imported caffe2 (gone from PyTorch); keep its caffe2 API optional."""
    path = src / "detectron2" / "export" / "__init__.py"
    return _sub(
        path,
        r"\nfrom \.api import \*\n",
        "\ntry:  # caffe2 export needs caffe2, which PyTorch no longer ships\n"
        "    from .api import *\n"
        "except ImportError:\n"
        "    pass\n",
    )


def fix_compiled_extension(src: Path) -> bool:
    """Replace the compiled ``detectron2._C`` by a Python module that fails clearly when used."""
    shim = src / "detectron2" / "_C.py"
    if shim.exists() and shim.read_text() == C_SHIM:
        return False
    shim.write_text(C_SHIM)
    return True


def fix_setup_py(src: Path) -> bool:
    """A setup.py without C++ extensions, named ``detectron2``, packaging the model-zoo configs."""
    init = (src / "detectron2" / "__init__.py").read_text()
    version = re.search(r"__version__\s*=\s*[\"']([^\"']+)", init).group(1)
    (src / "setup.py").write_text(SETUP_PY.format(version=f"{version}+severstal1", requires=INSTALL_REQUIRES))
    for stale in ("pyproject.toml", "setup.cfg"):
        (src / stale).unlink(missing_ok=True)
    return True


FIXES: list[Callable[[Path], bool]] = [
    fix_model_zoo_configs,
    fix_pkg_resources,
    fix_pillow_10,
    fix_numpy_aliases,
    fix_export_without_caffe2,
    fix_compiled_extension,
    fix_setup_py,
]


def fetch_source(spec: str, python: str, workdir: Path) -> Path:
    """Unpack Detectron2's sources named by ``spec`` into ``workdir`` and return their root.

    Args:
        spec: a pip requirement (default ``pb1-detectron2==0.6``), a git URL, a local folder or an sdist.
        python: the interpreter whose pip downloads the requirement (torch must be importable there).
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        dest = workdir / "src"
        shutil.copytree(path, dest, ignore=shutil.ignore_patterns(".git", "build", "*.so"))
        return dest
    if spec.startswith(("git+", "https://", "http://", "git@")) or spec.endswith(".git"):
        dest = workdir / "src"
        subprocess.run(["git", "clone", "--depth", "1", spec.removeprefix("git+"), str(dest)], check=True,
                       stdout=sys.stderr)
        return dest
    if not path.is_file():
        subprocess.run(
            [python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
             "-d", str(workdir), spec],
            check=True,
            stdout=sys.stderr,
        )
        archives = sorted(workdir.glob("*.tar.gz"))
        if not archives:
            raise SystemExit(f"pip download of {spec!r} gave no source archive in {workdir}")
        path = archives[0]
    with tarfile.open(path) as tar:
        tar.extractall(workdir / "src", filter="data")
    roots = [p for p in (workdir / "src").iterdir() if (p / "detectron2").is_dir()]
    if not roots:
        raise SystemExit(f"{path} holds no detectron2/ package")
    return roots[0]


def cache_key(spec: str) -> str:
    """Identifies a build: this file's fixes and the source it was built from."""
    digest = hashlib.sha256(Path(__file__).read_bytes() + spec.encode()).hexdigest()
    return digest[:16]


def build(spec: str, python: str, cache: Path) -> Path:
    """Return the cached wheel for ``spec``, building it first when missing."""
    out = cache / cache_key(spec)
    wheels = sorted(out.glob("detectron2-*.whl"))
    if wheels:
        log.info("using cached %s", wheels[0])
        return wheels[0]
    with tempfile.TemporaryDirectory(prefix="detectron2-build-") as tmp:
        src = fetch_source(spec, python, Path(tmp))
        for fix in FIXES:
            log.info("%-28s %s", fix.__name__, "applied" if fix(src) else "not needed")
        staging = Path(tmp) / "wheel"
        subprocess.run(
            [python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(staging), str(src)],
            check=True,
            stdout=sys.stderr,
        )
        out.mkdir(parents=True, exist_ok=True)
        built = next(staging.glob("detectron2-*.whl"))
        final = out / built.name
        shutil.move(built, final)
    log.info("built %s", final)
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter of the target environment")
    parser.add_argument("--cache", type=Path, default=Path(".cache/detectron2"), help="wheel cache folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="detectron2_build: %(message)s")
    spec = os.environ.get(SOURCE_ENV) or DEFAULT_SOURCE
    print(build(spec, args.python, args.cache))


if __name__ == "__main__":
    main()
