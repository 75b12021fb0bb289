"""NVIDIA Model Optimizer (``modelopt.onnx.quantization``) driven on one component graph.

INT8 and FP8 produce Q/DQ graphs calibrated on real feeds (``calibrate.py``); INT4 is weight-only
(AWQ, blocked DQ on the MatMul weights). Calibration runs on ONNX Runtime's CPU provider
(``calibration_eps=["cpu"]``).

Model Optimizer infers GEMM shapes from the FIRST calibration feed and leaves GEMMs it believes are
GEMVs (an M of 1) unquantized, so the reader hands the largest feed first (``calibrate.select``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from ..export.external_data import copy_graph, has_external, load_graph, save_graph
from ..export.gqa import share_rotary_tables
from ..export.graph_edit import set_nodes

Feed = dict[str, np.ndarray]

_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64,
       onnx.TensorProto.BOOL: np.bool_, onnx.TensorProto.INT32: np.int32}


class MissingDependency(RuntimeError):
    pass


def available() -> bool:
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def _require():
    try:
        import modelopt.onnx.quantization as mq
    except Exception as e:  # noqa: BLE001
        raise MissingDependency(
            "NVIDIA Model Optimizer is not installed: pip install nvidia-modelopt onnxconverter-common onnxslim lief "
            f"cppimport ml_dtypes onnx-graphsurgeon polygraphy ({e})") from None
    return mq


def feed_reader(feeds: list[Feed], graph: onnx.ModelProto):
    """An ORT ``CalibrationDataReader`` (plus ``get_first``, which Model Optimizer calls) over ``feeds``,
    each cast to the graph's input dtypes."""
    from onnxruntime.quantization import CalibrationDataReader

    init = {i.name for i in graph.graph.initializer}
    types = {i.name: _NP.get(i.type.tensor_type.elem_type) for i in graph.graph.input if i.name not in init}
    cast = [{k: np.ascontiguousarray(v.astype(types[k]) if types.get(k) else v) for k, v in f.items() if k in types} for f in feeds]
    if not cast:
        raise ValueError("no calibration feeds")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(cast)

        def get_next(self):
            return next(self._it, None)

        def get_first(self):
            return cast[0]

        def rewind(self):
            self._it = iter(cast)

        def __len__(self):
            return len(cast)

    return Reader()


def quantize(
    src: Path,
    dst: Path,
    mode: str,
    feeds: list[Feed],
    *,
    high_precision: str = "fp32",
    nodes_to_exclude: list[str] | None = None,
    op_types_to_quantize: list[str] | None = None,
    op_types_to_exclude: list[str] | None = None,
    op_types_to_exclude_fp16: list[str] | None = None,
    calibration_method: str | None = None,
    block_size: int | None = None,
    disable_mha_qdq: bool = False,
    verbose: bool = False,
) -> None:
    """``mode``: 'int8', 'fp8' or 'int4' (AWQ weight-only). Writes ``dst`` (a single file)."""
    mq = _require()
    src, dst = Path(src), Path(dst)
    graph = onnx.load(str(src), load_external_data=False)
    # A graph with external data goes in as a path with its data beside it (Model Optimizer reads
    # and writes it that way, ``<output>_data``); its output is rewritten below by our own rule.
    external = has_external(src)
    reader = feed_reader(feeds, graph)
    kwargs = dict(
        quantize_mode=mode, calibration_data_reader=reader, calibration_eps=["cpu"],
        nodes_to_exclude=resolve_nodes(graph, nodes_to_exclude), op_types_to_exclude=op_types_to_exclude,
        op_types_to_quantize=op_types_to_quantize, log_level="INFO" if verbose else "ERROR",
        use_external_data_format=external,
    )
    if calibration_method:
        kwargs["calibration_method"] = calibration_method
    if mode in ("int8", "fp8"):
        kwargs.update(high_precision_dtype=high_precision, disable_mha_qdq=disable_mha_qdq,
                      op_types_to_exclude_fp16=op_types_to_exclude_fp16)
        if high_precision == "fp32":
            kwargs["mha_accumulation_dtype"] = "fp32"
    elif mode == "int4":
        # AWQ concatenates each GEMM's activations over the feeds: they must share one shape.
        reader = feed_reader(same_shape(feeds), graph)
        kwargs.update(calibration_data_reader=reader, block_size=block_size or 128)
    else:
        raise ValueError(f"unknown Model Optimizer mode {mode!r}")
    # Model Optimizer writes intermediates next to its input: work on a private copy.
    with tempfile.TemporaryDirectory(prefix="emma-modelopt-") as td:
        work = Path(td) / src.name
        copy_graph(src, work)
        out = Path(td) / (src.stem + f".{mode}.onnx")
        with _quiet(verbose):
            mq.quantize(str(work), output_path=str(out), **kwargs)
        if not out.exists():
            raise RuntimeError(f"{src.name}: Model Optimizer wrote no {mode} graph")
        m = load_graph(out)
        share_rotary_tables(m)  # Model Optimizer gave each layer its own copy
        save_graph(m, dst)


def resolve_nodes(graph: onnx.ModelProto, patterns) -> list[str]:
    """Node-name patterns (``re.search``, as the policy writes them) -> exact, anchored patterns:
    Model Optimizer applies ``re.match`` (anchored at the start), which would silently match nothing."""
    import re

    names = [n.name for n in graph.graph.node]
    hits = [n for n in names if any(re.search(p, n) for p in (patterns or []))]
    return [f"^{re.escape(n)}$" for n in hits]


def same_shape(feeds: list[Feed]) -> list[Feed]:
    """The largest group of feeds whose activations share a shape (past KV and masks may differ):
    the group holding the most elements in all, so long prefixes beat many one-token steps."""
    def key(f: Feed):
        return tuple((k, v.shape) for k, v in sorted(f.items()) if not k.startswith("past_") and k != "attention_mask" and k != "position_ids")

    groups: dict = {}
    for f in feeds:
        groups.setdefault(key(f), []).append(f)
    def tokens(f: Feed) -> int:
        return sum(v.size for k, v in f.items() if not k.startswith("past_") and k not in ("attention_mask", "position_ids"))

    return max(groups.values(), key=lambda g: sum(tokens(f) for f in g))


@contextlib.contextmanager
def _quiet(verbose: bool):
    """Model Optimizer and ORT's calibrator print progress bars and banners: keep them out of the CLI."""
    if verbose:
        yield
        return
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    loggers = [logging.getLogger(n) for n in ("modelopt", "onnx2onnx", "polygraphy", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield
    except BaseException:
        tail = buf.getvalue()[-4000:]
        if tail:
            logging.getLogger(__name__).error("Model Optimizer output (tail):\n%s", tail)
        raise
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old


def reduce_weight_range(path: Path, bits: int = 7) -> int:
    """Re-scales every INT8 weight quantizer to ``bits`` bits (ORT's ``reduce_range``).

    ONNX Runtime's x86 INT8 GEMM without VNNI (AVX2: vpmaddubsw) adds pairs of u8 x s8 products in
    int16 and saturates when both are near full range; 7-bit weights keep every pair sum in range.
    Returns the number of weight quantizers changed."""
    from onnx import numpy_helper

    m = load_graph(path)
    init = {i.name: i for i in m.graph.initializer}
    qmax = float(2 ** (bits - 1) - 1)
    done: set[str] = set()
    n = 0
    for node in m.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in init or len(node.input) < 3:
            continue
        zp = init.get(node.input[2])
        if zp is None or zp.data_type != onnx.TensorProto.INT8:
            continue
        scale = node.input[1]
        if scale in done or scale not in init:
            continue
        s = numpy_helper.to_array(init[scale])
        init[scale].CopyFrom(numpy_helper.from_array((s * (127.0 / qmax)).astype(s.dtype), scale))
        done.add(scale)
        n += 1
    save_graph(m, path)
    return n


def fold_weight_quantizers(path: Path) -> int:
    """Stores every quantized weight as its quantized initializer feeding the DequantizeLinear
    (Q(constant) -> DQ becomes constant_q -> DQ): the graph shrinks to int8 / fp8 weight bytes and
    computes exactly what the Q/DQ pair computed. Returns the number of weights folded."""
    import ml_dtypes
    from onnx import numpy_helper

    m = load_graph(path)
    g = m.graph
    init = {i.name: i for i in g.initializer}
    consumers: dict[str, int] = {}
    for node in g.node:
        for i in node.input:
            consumers[i] = consumers.get(i, 0) + 1
    keep, new_inits, folded = [], [], 0
    for node in g.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in init and len(node.input) >= 3 and node.input[2] in init:
            w = numpy_helper.to_array(init[node.input[0]]).astype(np.float32)
            scale = numpy_helper.to_array(init[node.input[1]]).astype(np.float32)
            zp_t = init[node.input[2]]
            zp = numpy_helper.to_array(zp_t)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if any(a.name == "block_size" and a.i for a in node.attribute):
                keep.append(node)
                continue
            if scale.ndim == 1 and scale.size > 1:
                shape = [1] * w.ndim
                shape[axis % w.ndim] = scale.size
                scale = scale.reshape(shape)
                zp = zp.reshape(shape)
            if zp_t.data_type == onnx.TensorProto.FLOAT8E4M3FN:
                q = np.clip(w / scale, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn)  # saturate, as Q does
                t = onnx.TensorProto()
                t.name = node.output[0]
                t.data_type = onnx.TensorProto.FLOAT8E4M3FN
                t.dims.extend(q.shape)
                t.raw_data = q.view(np.uint8).tobytes()
            elif zp_t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
                info = np.iinfo(np.int8 if zp_t.data_type == onnx.TensorProto.INT8 else np.uint8)
                q = np.clip(np.rint(w / scale) + zp.astype(np.int32), info.min, info.max).astype(info.dtype)
                t = numpy_helper.from_array(q, node.output[0])
            else:
                keep.append(node)
                continue
            new_inits.append(t)
            folded += 1
            continue
        keep.append(node)
    set_nodes(g, keep, new_inits)  # the float weights nothing reads any more go
    save_graph(m, path)
    return folded


def activations_to_uint8(path: Path) -> int:
    """Activation Q/DQ pairs from int8 (zero point 0) to uint8 (zero point 128): the same values.

    ONNX Runtime rewrites int8 activation Q/DQ to uint8 itself (QDQS8ToU8Transformer) before fusing
    u8 x s8 integer GEMMs; in ORT 1.2x that rewrite mis-computes the backbone when the KV cache
    input is empty (a first chunk: rel L2 ~3 instead of 0.04). Written as uint8 in the graph, the
    transformer has nothing to do, and every weight MatMul fuses into ``MatMulIntegerToFloat``: with
    the int8 graph 56 of 72 MatMuls of the small backbone ran in fp32 on weights dequantized every
    call (a decode step 43.7 ms, against 3.4 ms written as uint8 and 6.4 ms in fp32). TensorRT wants
    the int8 form, so this is for the cpu target only. Returns the number of activation quantizers
    changed."""
    from onnx import numpy_helper

    m = load_graph(path)
    g = m.graph
    init = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    made: dict[str, str] = {}
    n = 0
    for node in g.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in init or len(node.input) < 3:
            continue
        zp = init.get(node.input[2])
        if zp is None or zp.data_type != onnx.TensorProto.INT8:
            continue
        name = node.input[2]
        if name not in made:
            z = numpy_helper.to_array(zp).astype(np.int16) + 128
            new = numpy_helper.from_array(z.astype(np.uint8), name + "_u8")
            g.initializer.append(new)
            made[name] = new.name
        node.input[2] = made[name]
        for dq in consumers.get(node.output[0], []):
            if dq.op_type == "DequantizeLinear" and len(dq.input) >= 3 and dq.input[2] == name:
                dq.input[2] = made[name]
        n += 1
    used = {i for nd in g.node for i in nd.input}
    live = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(live)
    save_graph(m, path)
    return n
