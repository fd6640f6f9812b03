"""The install: Detectron2 builds and runs on today's packages, pins agree, the CLI answers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL
import pytest
import tomllib
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_detectron2_imports_with_todays_numpy_and_pillow():
    import detectron2
    import detectron2.data.transforms  # Image.LINEAR was here
    import detectron2.export  # imported caffe2
    from detectron2.data.transforms import ExtentTransform

    assert detectron2.__version__.startswith("0.6")
    assert int(np.__version__.split(".")[0]) >= 2
    assert int(PIL.__version__.split(".")[0]) >= 10
    assert hasattr(detectron2.export, "TracingAdapter")
    out = ExtentTransform((0, 0, 4, 4), (2, 2)).apply_image(np.zeros((4, 4, 3), np.uint8))
    assert out.shape == (2, 2, 3)


def test_compiled_ops_fail_clearly_and_environment_helpers_work():
    from detectron2 import _C

    assert isinstance(_C.get_compiler_version(), str)
    assert _C.has_cuda() is False
    with pytest.raises(NotImplementedError, match="deform_conv_forward.*does not include"):
        _C.deform_conv_forward  # noqa: B018  (the attribute access itself must raise)


def test_model_zoo_config_resolves_offline():
    from detectron2 import model_zoo

    path = Path(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"))
    assert path.is_file()
    assert (path.parent.parent / "Base-RCNN-FPN.yaml").is_file()


def test_mask_rcnn_r50_forward_on_a_256x1600_image():
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"))
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 4
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg).eval()
    assert model.roi_heads.box_predictor.cls_score.out_features == 5  # 4 classes + background
    with torch.inference_mode():
        (out,) = model([{"image": torch.rand(3, 256, 1600) * 255, "height": 256, "width": 1600}])
    instances = out["instances"]
    assert instances.image_size == (256, 1600)
    if len(instances):
        assert instances.pred_masks.shape[1:] == (256, 1600)
        assert int(instances.pred_classes.max()) <= 3


def _pins_from_pyproject() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
    return dict(r.split("==") for r in reqs if "==" in r and not r.startswith("detectron2"))


def test_environment_yml_has_the_same_pins_as_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert dict(r.split("==") for r in pip_section) == _pins_from_pyproject()
    assert "python=3.11" in env["dependencies"]


def test_installed_versions_match_the_pins():
    from importlib.metadata import version

    pins = {name.split("[")[0]: pin for name, pin in _pins_from_pyproject().items()}  # ray[data] -> ray
    wrong = {name: (pin, version(name)) for name, pin in pins.items() if version(name) != pin}
    assert not wrong, f"installed versions differ from pyproject.toml pins: {wrong}"


def test_cli_help_lists_the_commands():
    from severstal.cli import COMMANDS

    assert {"convert", "synth", "train", "evaluate", "predict"} <= set(COMMANDS)
    out = subprocess.run([sys.executable, "-m", "severstal.cli", "--help"], capture_output=True, text=True, check=True)
    for name in COMMANDS:
        assert re.search(rf"^\s+{name}\s", out.stdout, re.M), f"{name} missing from severstal --help"
        sub = subprocess.run([sys.executable, "-m", "severstal.cli", name, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0 and f"usage: severstal {name}" in sub.stdout, name
