"""The fused Und backbone (ONNX Runtime's GroupQueryAttention) against the reference, and where it is chosen."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from emma_export.components import Backbone, GQABackbone, gqa_possible
from emma_export.export.bundle_writer import default_attention
from emma_export.model.backbone import UND
from emma_export.verify import gqa_pairs, rel_l2
from emma_runtime.pipelines import Pipeline


@pytest.mark.parametrize("case", range(4))
def test_the_torch_op_computes_what_the_reference_computes(tiny_reference, case):
    """group_query_attention (what the tracer runs) against the standard module on the same step:
    decode, a chunk after a prefix, rows of different lengths, a right-padded batched prefill."""
    cfg = tiny_reference.cfg
    g = GQABackbone()
    dims = g.verify_dims(cfg)[case]
    feeds = g.sample_inputs(cfg, dims, np.random.default_rng(case))
    with torch.no_grad():
        got = g.module(tiny_reference)(*[torch.from_numpy(feeds[s.name]) for s in g.inputs(cfg)])
    pairs = gqa_pairs(cfg, Backbone(UND).module(tiny_reference).eval(), feeds, [t.numpy() for t in got])
    assert len(pairs) == 1 + 2 * 2 * cfg.llm.num_hidden_layers
    for name, a, b in pairs:
        assert a.shape == b.shape and rel_l2(a, b) < 1e-5, (name, dims)


def test_a_standard_feed_runs_the_same_step_on_both_graphs(tiny_bundle, tiny_bundle_standard, tiny_reference):
    """Calibration feeds are captured for the standard graph and converted for a gqa one: both give
    the same hidden states and the same new keys/values."""
    cfg = tiny_reference.cfg
    std = Backbone(UND).sample_inputs(cfg, {"batch": 1, "seq": 6, "past": 9, "total": 15}, np.random.default_rng(3))
    fused = GQABackbone.from_standard(cfg, std)
    assert fused["seqlens_k"].tolist() == [14] and int(fused["total_sequence_length"]) == 15
    s_std = ort.InferenceSession(str(tiny_bundle_standard / "backbone_und.onnx"), providers=["CPUExecutionProvider"])
    s_gqa = ort.InferenceSession(str(tiny_bundle / "backbone_und.onnx"), providers=["CPUExecutionProvider"])
    a = s_std.run(None, std)
    b = s_gqa.run(None, fused)
    assert rel_l2(b[0], a[0]) < 1e-5
    np.testing.assert_allclose(b[1][:, :, 9:15], a[1], atol=1e-5)  # present_key_0's new slots == new_key_0
    np.testing.assert_array_equal(b[1][:, :, :9], std["past_key_0"])  # the past is left as it was
    # a padded row inside the past is not something GroupQueryAttention can express
    holes = dict(std, attention_mask=std["attention_mask"].copy())
    holes["attention_mask"][:, :, 2] = False
    assert GQABackbone.from_standard(cfg, holes) is None


def test_a_gqa_graph_runs_only_what_it_can(tiny_bundle):
    from emma_runtime.kv_cache import KVCache

    p = Pipeline.load(tiny_bundle)
    cache = KVCache.allocate(p.backend, p.dims, 2, 8, p.kv_dtype)
    with pytest.raises(ValueError, match="causal chunks"):
        p.run_chunk(cache, np.zeros((2, 3, p.dims.hidden_size), np.float32), "und", causal=False)
    cache.commit(np.array([2, 1]))
    with pytest.raises(ValueError, match="empty cache"):
        p.run_chunk(cache, np.zeros((2, 3, p.dims.hidden_size), np.float32), "und", causal=True)
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        p.run_chunk(cache, np.zeros((2, 7, p.dims.hidden_size), np.float32), "und", causal=True)


def test_the_flavour_follows_the_target_and_precision(tiny_cfg):
    assert gqa_possible(tiny_cfg)
    assert default_attention(tiny_cfg, "cpu", "fp32") == "gqa"
    assert default_attention(tiny_cfg, "cpu", "int4w") == "gqa"
    assert default_attention(tiny_cfg, "cpu", "int8") == "gqa"  # quantized from converted calibration feeds
    assert default_attention(tiny_cfg, "rtx-ada", "fp8") == "standard"  # TensorRT parses standard operators only
    import dataclasses

    und_reference = dataclasses.replace(tiny_cfg, reference_branch="und")
    assert not gqa_possible(und_reference) and default_attention(und_reference, "cpu", "fp32") == "standard"


def test_build_refuses_gqa_where_it_cannot_run(tmp_path):
    from emma_export.build import BuildError, build

    with pytest.raises(BuildError, match="--attention standard"):
        build(out=tmp_path / "b", config_name="tiny", precision="fp8", target="rtx-ada", attention="gqa", echo=lambda s: None)
    assert not (tmp_path / "b").exists()
