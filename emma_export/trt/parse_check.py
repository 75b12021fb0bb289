"""Does TensorRT's ONNX parser accept every graph of a bundle? (No engine is built, no GPU needed.)

Uses whichever TensorRT module imports here (full TensorRT first, else TensorRT-RTX); both parse
into a strongly typed network, as the engine builder does.
"""

from __future__ import annotations

from pathlib import Path

from emma_runtime.bundle import Bundle

from .builder import EngineBuildError, _make_logger, available_module, parse_network

OK = "ok"


def parse_bundle(bundle_dir: str | Path, components: list[str] | None = None) -> dict[str, str]:
    """component -> "ok", or one line naming the node, its operator and the parser's reason.
    Raises TrtUnavailable when no TensorRT module imports."""
    trt, flavour = available_module()
    bundle = Bundle.load(bundle_dir)
    names = components or list(bundle.manifest.components)
    out: dict[str, str] = {}
    for name in names:
        info = bundle.manifest.components[name]
        logger = _make_logger(trt)
        builder = trt.Builder(logger)
        try:
            parse_network(trt, builder, bundle.path(info.file), logger, name)
            out[name] = OK
        except EngineBuildError as e:
            out[name] = str(e)
    return out


def parser_name() -> str:
    """"tensorrt 10.x" or "tensorrt-rtx 1.x": the module parse_bundle would use."""
    trt, flavour = available_module()
    return f"{flavour} {trt.__version__}"
