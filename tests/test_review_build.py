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


def test_copy_graph_copies_no_file_from_outside_the_graphs_folder(tmp_path):
    """A graph's external-data location is read from the graph file, which a bundle's manifest only
    hashes (quantize_bundle copies every component with ``copy_graph``): '../secret.data' was read from
    beside the bundle and written beside the copy. It must stop with an error naming the location."""
    import onnx
    from onnx import TensorProto, helper

    from emma_export.export.external_data import copy_graph, set_external

    (tmp_path / "secret.data").write_bytes(b"\x00" * 4096)
    src = tmp_path / "bundle" / "g.onnx"
    src.parent.mkdir()
    w = TensorProto()
    w.name, w.data_type = "w", TensorProto.FLOAT
    w.dims.extend([32, 32])
    set_external(w, "../secret.data", 0, 4096)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    src.write_bytes(helper.make_model(g).SerializeToString())
    dst = tmp_path / "work" / "sub" / "g.onnx"
    with pytest.raises(ValueError, match=r"\.\./secret\.data"):
        copy_graph(src, dst)
    assert not (tmp_path / "work" / "secret.data").exists()
