"""Graphs with external data (issue 23): with the threshold lowered (EMMA_EXTERNAL_DATA_BYTES=0) every
tiny graph takes the path emma-4b's > 2 GB graphs take. Export writes ``<graph>.data`` beside each
graph and the tied embedding once; int8 and fp8 quantize such a bundle, keep every data file listed
(with its sha256) and inside the bundle, pass verify, and the runtime runs the result."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
import torch

for _mod in ("modelopt.onnx.quantization", "onnxconverter_common", "ml_dtypes", "skimage"):
    pytest.importorskip(_mod, reason="the quant extra is not installed (pip install -e '.[quant]')")


@pytest.fixture(scope="module")
def external_env():
    mp = pytest.MonkeyPatch()
    mp.setenv("EMMA_EXTERNAL_DATA_BYTES", "0")
    # and emma-4b's way through every stage: weights streamed at export, graphs quantized layer by layer
    mp.setenv("EMMA_STREAM_BYTES", "0")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs; on a busy 2-core machine more threads only contend
    yield
    torch.set_num_threads(before)
    mp.undo()


@pytest.fixture(scope="module")
def ext_bundle(tmp_path_factory, external_env):
    from emma_export.export.bundle_writer import export_bundle
    from emma_export.export.source import WeightSource

    out = tmp_path_factory.mktemp("ext") / "tiny"
    export_bundle(WeightSource.from_args("tiny", None, 0), out, progress=False)
    return out


@pytest.fixture(scope="module")
def small_calibration(tmp_path_factory, tiny_reference, tokenizer, external_env):
    """A short recipe: this test is about the files, the quantizer's accuracy is test_quantize's."""
    from emma_export.quantize.calibrate import Recipe, capture, save

    feeds = capture(tiny_reference, tokenizer, Recipe(images=3, understand_prompts=1, generate_prompts=2,
                                                      edit_prompts=1, max_new_tokens=3, sizes=2))
    d = tmp_path_factory.mktemp("calib-ext")
    save(feeds, d)
    return d


def _manifest(b):
    return json.loads((b / "manifest.json").read_text())


def _check_files(b) -> dict:
    """Every file a graph references is listed, with the sha256 of its bytes, in the graph's folder."""
    from emma_export.export.external_data import referenced_files

    m = _manifest(b)
    listed = {}
    for name, c in m["components"].items():
        refs = referenced_files(onnx.load(str(b / c["file"]), load_external_data=False))
        assert sorted(f for f, _ in c["data_files"]) == refs, name
        for f, sha in c["data_files"]:
            assert "/" not in f and (b / f).is_file()
            assert hashlib.sha256((b / f).read_bytes()).hexdigest() == sha
        listed[name] = refs
    # nothing unlisted is left behind in the folder
    on_disk = {p.name for p in b.iterdir() if p.name.endswith(".data")}
    assert on_disk == {f for refs in listed.values() for f in refs}
    return listed


def test_export_writes_external_data_and_the_embedding_once(ext_bundle, tiny_reference):
    from emma_export.export.tied_embedding import TIED_FILE
    from emma_export.verify import verify_components
    from emma_runtime.bundle import Bundle

    listed = _check_files(ext_bundle)
    assert "backbone_und.onnx.data" in listed["backbone_und"]
    m = _manifest(ext_bundle)
    e, h = m["components"]["embed_tokens"], m["components"]["lm_head"]
    assert e["data_files"] == h["data_files"] == [[TIED_FILE, e["data_files"][0][1]]]
    cfg = tiny_reference.cfg
    assert (ext_bundle / TIED_FILE).stat().st_size == cfg.llm.vocab_size * cfg.llm.hidden_size * 4
    # the LM head holds no copy of its own
    head = onnx.load(str(ext_bundle / h["file"]), load_external_data=False)
    assert all(np.prod(t.dims) < cfg.llm.vocab_size for t in head.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
    res = verify_components(Bundle.load(ext_bundle), tiny_reference, names=["embed_tokens", "lm_head", "backbone_und"])
    assert all(r.passed for r in res.values()), res


def test_the_shared_table_is_hashed_once_and_a_second_digest_for_it_fails(ext_bundle, tmp_path, monkeypatch):
    """Two components list the tied table (1.56 GB at emma-4b): Bundle.load hashes it once. Listed
    with two different digests, it is still checked against both, so the load fails."""
    import json
    import shutil

    from emma_export.export.tied_embedding import TIED_FILE
    from emma_runtime import bundle as bundle_mod
    from emma_runtime.bundle import MANIFEST, Bundle, BundleError

    real, seen = bundle_mod.sha256_regular, []

    def counting(path, *a, **k):
        seen.append(path.name)
        return real(path, *a, **k)

    monkeypatch.setattr(bundle_mod, "sha256_regular", counting)
    Bundle.load(ext_bundle)
    assert seen.count(TIED_FILE) == 1 and len(seen) == len(set(seen)), seen
    bad = tmp_path / "bad"
    shutil.copytree(ext_bundle, bad)
    man = json.loads((bad / MANIFEST).read_text())
    man["components"]["lm_head"]["data_files"] = [[TIED_FILE, "0" * 64]]
    (bad / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(BundleError, match=TIED_FILE):
        Bundle.load(bad)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_external_bundle_verifies_and_runs(tmp_path, ext_bundle, small_calibration, precision):
    from emma_export.build import build
    from emma_runtime.pipelines import Pipeline

    rep = build(source_bundle=ext_bundle, precision=precision, target="cpu", out=tmp_path / precision,
                calibration=small_calibration, e2e=False, task_eval_n=0, echo=lambda s: None)
    assert rep.passed, rep.failures
    b = tmp_path / precision
    listed = _check_files(b)
    m = _manifest(b)
    assert m["components"]["backbone_und"]["precision"] == precision
    assert "backbone_und.onnx.data" in listed["backbone_und"]
    # the LM head is quantized: its weight is no longer the embedding's bytes, so nothing is shared
    assert not set(listed["embed_tokens"]) & set(listed["lm_head"])
    w = onnx.load(str(b / "backbone_und.onnx"), load_external_data=False)
    want = onnx.TensorProto.UINT8 if precision == "int8" else onnx.TensorProto.FLOAT8E4M3FN
    want = {onnx.TensorProto.INT8, want}
    assert any(t.data_type in want and t.data_location == onnx.TensorProto.EXTERNAL for t in w.graph.initializer)
    p = Pipeline.load(b)
    img = np.random.default_rng(0).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    out = p.understand(img, "what is this?", max_new_tokens=3)
    assert len(out.token_ids) >= 1


def test_fp16_and_int4w_keep_the_embedding_shared(tmp_path, ext_bundle, small_calibration):
    """fp16 (and int4w, whose LM head stays high) convert both graphs' table to the same bytes: the
    tie is made again after conversion, one file for both."""
    from emma_export.export.tied_embedding import TIED_FILE
    from emma_export.quantize import quantize_bundle
    from emma_export.quantize.calibrate import load_dir
    from emma_export.targets import load_target

    import shutil

    b = tmp_path / "fp16"
    shutil.copytree(ext_bundle, b)
    quantize_bundle(b, "fp16", load_target("cpu"), load_dir(small_calibration))
    listed = _check_files(b)
    assert listed["embed_tokens"] == listed["lm_head"] == [TIED_FILE]
    cfg_bytes = (b / TIED_FILE).stat().st_size
    assert cfg_bytes == (ext_bundle / TIED_FILE).stat().st_size // 2  # stored as fp16, once


def test_int4w_external_bundle_quantizes_and_keeps_the_tie(tmp_path, ext_bundle, small_calibration):
    """int4w: AWQ on the backbones' external-data graphs (Model Optimizer given the path with its data);
    the LM head stays high, so the table is stored once again after conversion."""
    import shutil

    from emma_export.export.tied_embedding import TIED_FILE
    from emma_export.quantize import quantize_bundle
    from emma_export.quantize.calibrate import load_dir
    from emma_export.targets import load_target
    from emma_export.verify import verify_components
    from emma_runtime.bundle import Bundle

    b = tmp_path / "int4w"
    shutil.copytree(ext_bundle, b)
    quantize_bundle(b, "int4w", load_target("cpu"), load_dir(small_calibration))
    listed = _check_files(b)
    assert listed["embed_tokens"] == listed["lm_head"] == [TIED_FILE]
    assert "backbone_und.onnx.data" in listed["backbone_und"]
    g = onnx.load(str(b / "backbone_und.onnx"), load_external_data=False)
    assert any(t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) for t in g.graph.initializer)
    bundle = Bundle.load(b)
    from emma_export.export.source import WeightSource

    res = verify_components(bundle, WeightSource.from_args("tiny", None, 0).full_model(), names=["lm_head", "embed_tokens"])
    assert all(r.passed for r in res.values()), res



@pytest.mark.parametrize("precision,target", [("int8", "cpu"), ("int4w", "cpu"), ("fp16", "cpu")])
def test_a_build_converts_its_graphs_without_a_second_copy_on_disk(tmp_path, ext_bundle, small_calibration, precision, target, monkeypatch):
    """In a build's own folder (``consume``) each source graph is moved out to be converted, not copied:
    an emma-4b fp8 build beside its init checkpoint ran out of disk with a 14.5 GB backbone copied next
    to its 36 GB export. The folder never holds a second copy of the graph being converted; the
    tied table two graphs read stays until both are converted; the bundle is whole after."""
    import shutil

    from emma_export import quantize as q
    from emma_export.export.tied_embedding import TIED_FILE
    from emma_export.quantize.calibrate import load_dir
    from emma_export.targets import load_target

    b = tmp_path / precision
    shutil.copytree(ext_bundle, b)
    du = lambda: sum(f.stat().st_size for f in b.rglob("*") if f.is_file())
    start, extra, real = du(), [], q.apply_plan

    def watched(p, src, dst, *a, **k):
        r = real(p, src, dst, *a, **k)
        made = sum(f.stat().st_size for f in dst.parent.rglob("*") if f.is_file())  # the results so far
        extra.append((p.component, du() - start - made))
        assert (b / TIED_FILE).is_file()  # embed_tokens and lm_head both read it
        return r

    monkeypatch.setattr(q, "apply_plan", watched)
    q.quantize_bundle(b, precision, load_target(target), load_dir(small_calibration), consume=True)
    # a copy shows as the component's own size (copied, every component fails); a converter's scratch
    # files (Model Optimizer's AWQ leaves a few hundred kB) are not a copy
    own = {n: sum((ext_bundle / f).stat().st_size for f in {c["file"], *(f for f, _ in c["data_files"])})
           for n, c in _manifest(ext_bundle)["components"].items()}
    assert all(e < own[n] / 2 for n, e in extra), [(n, e, own[n]) for n, e in extra if e >= own[n] / 2]
    _check_files(b)
