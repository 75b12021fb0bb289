"""Per-component ONNX export: parity with the reference, dynamic shapes, manifest, tampering."""

import dataclasses
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from emma_export.components import all_components, get_component
from emma_export.export.source import WeightSource
from emma_export.verify import verify_bundle, verify_components
from emma_runtime.bundle import FORMAT_VERSION, Bundle, BundleError, sha256_file


def test_every_component_matches_the_reference_at_several_shapes(tiny_bundle, tiny_reference):
    res = verify_components(Bundle.load(tiny_bundle), tiny_reference)
    assert set(res) == {c.name for c in all_components(tiny_reference.cfg)}
    for name, r in res.items():
        assert r.rel_l2 <= 1e-4, (name, r)
        assert len(r.shapes) >= 2


@pytest.mark.parametrize("flavour", ["gqa", "standard"])
def test_parity_fails_when_the_export_is_wrong(flavour, tmp_path, tiny_bundle, tiny_bundle_standard, tiny_reference):
    """A backbone exported with a wrong RoPE base must fail verify, in either flavour."""
    from emma_export.export.bundle_writer import export_bundle

    cfg = tiny_reference.cfg
    wrong = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, rope_theta=cfg.llm.rope_theta * 10))
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle if flavour == "gqa" else tiny_bundle_standard, bad)
    part = tmp_path / "part"
    export_bundle(WeightSource(wrong, 0), part, components=[get_component(cfg, "backbone_und", flavour)], progress=False)
    shutil.copyfile(part / "backbone_und.onnx", bad / "backbone_und.onnx")
    m = json.loads((bad / "manifest.json").read_text())
    m["components"]["backbone_und"]["sha256"] = sha256_file(bad / "backbone_und.onnx")
    (bad / "manifest.json").write_text(json.dumps(m))
    res = verify_components(Bundle.load(bad), tiny_reference, names=["backbone_und"])
    assert not res["backbone_und"].passed


def test_one_graph_serves_several_image_sizes(tiny_bundle):
    sess = ort.InferenceSession(str(tiny_bundle / "ae_encoder.onnx"), providers=["CPUExecutionProvider"])
    for (h, w), grid in (((64, 64), (2, 2)), ((128, 96), (4, 3)), ((32, 160), (1, 5))):
        (lat,) = sess.run(None, {"image": np.zeros((1, 3, h, w), np.float32)})
        assert lat.shape[2:] == grid


def test_manifest_schema(tiny_bundle):
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION
    assert m["precision"] == "fp32" and m["target"] == "cpu"
    assert m["config"]["name"] == "tiny"
    assert (tiny_bundle / m["tokenizer"]["file"]).exists()
    # the cpu target's Und backbone is the gqa flavour: per-layer cache buffers in, the same written out
    bb = m["components"]["backbone_und"]
    assert bb["attention"] == "gqa"
    names = [i["name"] for i in bb["inputs"]]
    assert names == ["inputs_embeds", "seqlens_k", "total_sequence_length"] + \
        [f"past_{kv}_{i}" for i in range(4) for kv in ("key", "value")]
    assert [o["name"] for o in bb["outputs"]] == ["hidden_states"] + [f"present_{kv}_{i}" for i in range(4) for kv in ("key", "value")]
    past = next(i for i in bb["inputs"] if i["name"] == "past_key_0")
    assert past["shape"] == ["batch", 2, "capacity", 16] and past["dtype"] == "float32"
    # the Gen backbone is standard: an explicit mask, the past per layer, the new keys/values out
    gen = m["components"]["backbone_gen"]
    assert "attention" not in gen
    assert [i["name"] for i in gen["inputs"]][:4] == ["inputs_embeds", "position_ids", "attention_mask", "past_key_0"]
    assert next(i for i in gen["inputs"] if i["name"] == "past_value_3")["shape"] == ["batch", 2, "past", 16]
    assert next(o for o in gen["outputs"] if o["name"] == "new_key_0")["shape"] == ["batch", 2, "seq", 16]
    assert next(i for i in gen["inputs"] if i["name"] == "attention_mask")["dtype"] == "bool"
    for name, c in m["components"].items():
        assert c["sha256"] == sha256_file(tiny_bundle / c["file"]), name
        for t in c["inputs"] + c["outputs"]:
            assert all(isinstance(d, (int, str)) for d in t["shape"])


def test_graphs_are_opset_19_and_pass_the_full_checker(tiny_bundle):
    for f in tiny_bundle.glob("*.onnx"):
        m = onnx.load(str(f))
        assert any(o.domain in ("", "ai.onnx") and o.version >= 19 for o in m.opset_import), f.name
        onnx.checker.check_model(m, full_check=True)


def test_tampered_bundle_is_rejected_naming_the_file(tmp_path, tiny_bundle):
    bad = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, bad)
    f = bad / "lm_head.onnx"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="lm_head.onnx: sha256 mismatch"):
        verify_bundle(bad)


def test_missing_component_is_rejected(tmp_path, tiny_bundle):
    bad = tmp_path / "missing"
    shutil.copytree(tiny_bundle, bad)
    m = json.loads((bad / "manifest.json").read_text())
    del m["components"]["gen_head"]
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="component 'gen_head' is missing"):
        Bundle.load(bad)


def test_failed_export_leaves_no_bundle(tmp_path, monkeypatch):
    import emma_export.export.bundle_writer as bw

    calls = {"n": 0}
    real = bw.export_component

    def flaky(comp, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure")
        return real(comp, *a, **k)

    monkeypatch.setattr(bw, "export_component", flaky)
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="simulated"):
        bw.export_bundle(WeightSource.from_args("tiny", None, 0), out, progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_export_and_verify_commands(tmp_path):
    from click.testing import CliRunner

    from emma_export.cli import main

    r = CliRunner().invoke(main, ["export", "--config", "tiny", "--component", "gen_head", "--component", "lm_head",
                                  "--out", str(tmp_path / "b"), "--quiet"])
    assert r.exit_code == 0, r.output
    # A partial bundle is not a bundle: verify names what is missing and fails.
    r = CliRunner().invoke(main, ["verify", "--bundle", str(tmp_path / "b")])
    assert r.exit_code != 0 and "component 'ae_encoder' is missing" in r.output
