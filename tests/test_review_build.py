"""Review: a calibration folder given to the build (``--calibration``, what scripts/emma4b.sh now
passes to both builds) is held to the same completeness check as a capture made in the build."""

from __future__ import annotations

import numpy as np
import pytest


def test_an_incomplete_calibration_folder_fails_the_build(tmp_path, tiny_bundle, tiny_cfg):
    """emma4b.sh skips the capture when backbone_und.npz exists; a capture killed after writing some
    files leaves such a folder. Loaded as it was, every component without a file was quantized with no
    feeds: an fp16 graph silently without its overflow check (``apply_plan``: sample None)."""
    from emma_runtime.bundle import Bundle

    from emma_export.build import BuildError, BuildRequest, stage_calibrate
    from emma_export.components import get_component
    from emma_export.quantize.calibrate import save

    comp = get_component(tiny_cfg, "backbone_und", "standard")
    feed = comp.sample_inputs(tiny_cfg, comp.verify_dims(tiny_cfg)[0], np.random.default_rng(0))
    save({"backbone_und": [feed]}, tmp_path / "calib")
    req = BuildRequest(out=tmp_path / "B", calibration=tmp_path / "calib")
    with pytest.raises(BuildError, match="captured nothing for"):
        stage_calibrate(req, Bundle.load(tiny_bundle), None, None)
