"""Specification tests of EMMA's own parts, written from the architecture brief (shared/design/EMMA.md)
and the paper, not from the model code.

The parity tests compare the runtime with the model class it was traced from, and the two share the
sequence layout, the timestep schedule and the sampling rule, so a wrong reading of the paper made
consistently on both sides passes them. Here every expected value is written out independently: the
fused adapter and the timestep embedding in numpy from the brief's formulas, the schedule's numbers by
hand, the attention masks as literal 0/1 tables for a small sequence, and the KV cache against a full
recomputation of the whole sequence in one forward pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emma_export.config import CONFIGS, get_config
from emma_export.model import pipelines as ref
from emma_runtime import template
from emma_runtime.pipelines import Pipeline
from emma_runtime.sampling import initial_noise, timesteps
from emma_runtime.template import Image, SpecialIds, Text
from emma_runtime.trace import StepTrace

TOL = 1e-5  # relative L2 of fp32 graphs against float64 numpy


# ---- the brief's formulas, in numpy -----------------------------------------------------------------


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _w(sd, name) -> np.ndarray:
    return sd[name].detach().double().numpy()


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _positions(h: int, w: int, dim: int) -> np.ndarray:
    """Fixed 2D sin-cos table (MAE layout): per token, [sin(y w_k), cos(y w_k), sin(x w_k), cos(x w_k)],
    w_k = 10000^(-k / (dim/4)); tokens row-major over the (h, w) grid."""
    q = dim // 4
    om = 1.0 / 10000.0 ** (np.arange(q) / q)
    return np.stack([np.concatenate([np.sin(y * om), np.cos(y * om), np.sin(x * om), np.cos(x * om)])
                     for y in range(h) for x in range(w)])


def _fused_adapter(sd, prefix: str, und: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """Brief: fused = cat([und (4 x ViT width), gen latents (C)], -1) per grid cell -> LN -> Linear ->
    GELU -> Linear(hidden), plus the 2D sin-cos positions. und (B, h, w, F), latents (B, C, h, w)."""
    B, h, w, _ = und.shape
    fused = np.concatenate([und, latents.transpose(0, 2, 3, 1)], axis=-1).reshape(B, h * w, -1).astype(np.float64)
    mu, var = fused.mean(-1, keepdims=True), fused.var(-1, keepdims=True)
    x = (fused - mu) / np.sqrt(var + 1e-6) * _w(sd, prefix + "norm.weight") + _w(sd, prefix + "norm.bias")
    x = _gelu_tanh(x @ _w(sd, prefix + "fc1.weight").T + _w(sd, prefix + "fc1.bias"))
    x = x @ _w(sd, prefix + "fc2.weight").T + _w(sd, prefix + "fc2.bias")
    return x + _positions(h, w, x.shape[-1])[None]


def _timestep_embedding(sd, t: float, freq_dim: int) -> np.ndarray:
    """Brief: sinusoidal(t * 1000) of freq_dim channels ([cos | sin], periods up to 10000) -> MLP -> hidden."""
    half = freq_dim // 2
    args = t * 1000.0 * np.exp(-np.log(10000.0) * np.arange(half) / half)
    e = np.concatenate([np.cos(args), np.sin(args)])
    h = e @ _w(sd, "gen_adapter.timestep.linear_1.weight").T + _w(sd, "gen_adapter.timestep.linear_1.bias")
    h = h / (1 + np.exp(-h))
    return h @ _w(sd, "gen_adapter.timestep.linear_2.weight").T + _w(sd, "gen_adapter.timestep.linear_2.bias")


def _gen_adapter(sd, und, latents, t: float, freq_dim: int) -> np.ndarray:
    return _fused_adapter(sd, "gen_adapter.fused.", und, latents) + _timestep_embedding(sd, t, freq_dim)[None, None]


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return Pipeline.load(tiny_bundle)


@pytest.fixture(scope="module")
def sd(tiny_reference):
    return tiny_reference.state_dict()


def _feeds(cfg, h=3, w=2, seed=0):
    rng = np.random.default_rng(seed)
    und = rng.standard_normal((1, h, w, cfg.vision.feature_dim)).astype(np.float32)
    lat = rng.standard_normal((1, cfg.ae.latent_channels, h, w)).astype(np.float32)
    return und, lat


# ---- channel-wise concatenation -----------------------------------------------------------------------


def test_fused_widths_from_the_brief():
    # 4 x 1152 understanding channels + 32 latent channels = 4640 per cell; tiny: 4 x 32 + 8 = 136
    assert get_config("emma-4b").fused_dim == 4 * 1152 + 32 == 4640
    assert get_config("tiny").fused_dim == 4 * 32 + 8 == 136
    for name in CONFIGS:
        c = get_config(name)
        assert c.vision.patch_size * c.vision.shuffle == c.cell  # both encoders produce the same grid
        assert c.fused_dim == c.vision.hidden_size * c.vision.shuffle**2 + c.ae.latent_channels


def test_channel_wise_concat_order_and_widths(pipe, tiny_reference, sd, tiny_cfg):
    """Understanding features first, latents last, per cell; a 3x2 grid so rows and columns differ."""
    und, lat = _feeds(tiny_cfg)
    want = _fused_adapter(sd, "und_adapter.", und, lat)
    assert sd["und_adapter.norm.weight"].shape == (136,) and sd["und_adapter.fc1.weight"].shape[1] == 136
    graph = pipe._run("und_adapter", und_features=und, latents=lat)["image_embeds"]
    assert graph.shape == (1, 6, tiny_cfg.llm.hidden_size)
    assert _rel(graph, want) < TOL
    with torch.no_grad():
        model = tiny_reference.und_adapter(torch.from_numpy(und), torch.from_numpy(lat)).numpy()
    assert _rel(model, want) < TOL
    # the order matters: the same weights on the swapped concatenation give something else
    swapped = np.concatenate([lat.transpose(0, 2, 3, 1), und], -1)
    assert _rel(_fused_adapter(sd, "und_adapter.", swapped[..., :128], swapped[..., 128:].transpose(0, 3, 1, 2)), want) > 1e-2


def test_understanding_image_tokens_are_the_fused_image(pipe, tiny_reference, sd):
    """The runtime's understanding tokens of an image are the adapter of [its expert's features | its latents]."""
    img = np.random.default_rng(1).uniform(-1, 1, (1, 3, 96, 64)).astype(np.float32)
    emb, expert = pipe.und_image_embeds(img)
    feats = pipe._run("und_trunk", pixel_values=img)
    und = pipe._run(f"und_expert_{expert}", trunk_hidden=feats["trunk_hidden"])["und_features"]
    lat = pipe._run("ae_encoder", image=img)["latents"]
    assert und.shape == (1, 3, 2, 128) and lat.shape == (1, 8, 3, 2)
    assert _rel(emb, _fused_adapter(sd, "und_adapter.", und, lat)) < TOL


# ---- noisy target tokens and the timestep embedding ----------------------------------------------------


def test_noisy_tokens_have_a_zero_understanding_slice(pipe, tiny_reference, sd, tiny_cfg):
    _, lat = _feeds(tiny_cfg, seed=2)
    zeros = np.zeros((1, 3, 2, tiny_cfg.vision.feature_dim), np.float32)
    want = _gen_adapter(sd, zeros, lat, 0.6, tiny_cfg.timestep_freq_dim)
    assert _rel(pipe.target_embeds(lat, 0.6), want) < TOL
    with torch.no_grad():
        model = tiny_reference.target_tokens(torch.from_numpy(lat), torch.tensor([0.6])).numpy()
    assert _rel(model, want) < TOL


def test_timestep_embedding_is_added_to_every_gen_token(pipe, sd, tiny_cfg):
    und, lat = _feeds(tiny_cfg, seed=3)
    fd = tiny_cfg.timestep_freq_dim
    outs = {}
    for t in (0.0, 0.25, 1.0):
        got = pipe._run("gen_adapter", und_features=und, latents=lat, timestep=np.full(1, t, np.float32))["image_embeds"]
        assert _rel(got, _gen_adapter(sd, und, lat, t, fd)) < TOL, t
        outs[t] = got.astype(np.float64)
    # the difference between two timesteps is one vector, the same on every token, and not zero
    d = outs[1.0] - outs[0.25]
    want = _timestep_embedding(sd, 1.0, fd) - _timestep_embedding(sd, 0.25, fd)
    assert np.linalg.norm(want) > 1e-2
    for i in range(d.shape[1]):
        assert _rel(d[0, i], want) < 1e-4
    # and the Gen adapter without it is the fused adapter of the same inputs
    assert _rel(outs[0.0] - _timestep_embedding(sd, 0.0, fd)[None, None], _fused_adapter(sd, "gen_adapter.fused.", und, lat)) < TOL


# ---- timestep schedule and shift ----------------------------------------------------------------------


def test_timestep_schedule_values_by_hand():
    # t' = s t / (1 + (s - 1) t) on t = 1 .. 0; s = 3, 4 steps: t = 1, .75, .5, .25, 0
    # -> 3/3 = 1, 2.25/2.5 = 0.9, 1.5/2 = 0.75, 0.75/1.5 = 0.5, 0
    np.testing.assert_allclose(timesteps(4, 3.0), [1.0, 0.9, 0.75, 0.5, 0.0], atol=1e-12)
    # shift 1 is the plain linear schedule (the shapes checkpoint samples with it)
    np.testing.assert_allclose(timesteps(4, 1.0), [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-12)
    # emma-4b: 50 steps, shift 3: t = 0.98 -> 2.94 / 2.96; t = 0.5 -> 0.75; t = 0.02 -> 0.06 / 1.04
    ts = timesteps(50, 3.0)
    assert len(ts) == 51 and ts[0] == 1.0 and ts[-1] == 0.0
    np.testing.assert_allclose([ts[1], ts[25], ts[49]], [2.94 / 2.96, 0.75, 0.06 / 1.04], atol=1e-12)
    # the shift keeps more steps at high noise: every shifted t is >= the unshifted one
    assert np.all(ts >= np.linspace(1, 0, 51) - 1e-12)
    c = get_config("emma-4b").sampler
    assert (c.steps, c.shift, c.cfg, c.cfg_text, c.cfg_image) == (50, 3.0, 4.0, 3.0, 1.5)


def test_runtime_and_reference_denoise_on_the_hand_schedule(pipe, tiny_reference):
    """tiny: 4 Euler steps at shift 3 -> the steps run at t = 1, .9, .75, .5 and x += (t_next - t) v."""
    hand = [1.0, 0.9, 0.75, 0.5, 0.0]
    noise = initial_noise(4, 8, 2, 2)
    for side in ("runtime", "reference"):
        tr = StepTrace()
        if side == "runtime":
            out = pipe.generate("a cat", noise=noise, trace=tr)
            lat = out.latents
        else:
            out = ref.generate(tiny_reference, pipe.tokenizer, "a cat", noise, trace=tr)
            lat = out.latents.numpy()
        np.testing.assert_allclose(tr.timesteps, hand[:4], atol=1e-6, err_msg=side)
        x = noise.astype(np.float64)
        for i, v in enumerate(tr.velocities):
            x = x + (hand[i + 1] - hand[i]) * v
            assert _rel(tr.latents[i], x) < 1e-5, (side, i)
        assert _rel(lat, x) < 1e-5


# ---- sequence layout -----------------------------------------------------------------------------------


def test_sequence_layouts_from_the_brief(tiny_bundle):
    """Understanding: the image, then the question, all Und; generation: the prompt, then the noisy target
    last (so the prompt's cache serves every step); editing: [reference][instruction][noisy target]."""
    sp = SpecialIds.from_tokenizer(Pipeline.load(tiny_bundle).tokenizer)
    q = [97, 98]
    assert template.understand(sp, q) == [
        Text((sp.im_start, sp.vision_start)), Image("input", "und"), Text((sp.vision_end, 97, 98, sp.im_end, sp.assistant))]
    assert template.generate(sp, q) == [Text((sp.im_start, 97, 98, sp.im_end, sp.vision_start)), Image("target", "gen")]
    assert template.edit(sp, q, False) == template.generate(sp, q)  # the guidance branch without a reference
    prefix, target = template.split_prefix(template.edit(sp, q, True, "gen"))
    assert target == Image("target", "gen") and prefix[1] == Image("reference", "gen")


# ---- editing: the reference image ---------------------------------------------------------------------


def _effective_mask(inputs) -> tuple[int, np.ndarray]:
    """What a backbone call lets each new token see, in one layout for both graph flavours: (P, mask
    (B, S, P + S)), P the longest row's cached length, row b's past at [0, P_b) and its chunk at [P, P + S).
    A standard graph's mask spans the whole cache buffer: nothing past a row's length may be visible.
    A gqa graph's is GroupQueryAttention's rule: causal, each row up to its ``seqlens_k``."""
    B, S = inputs["inputs_embeds"].shape[:2]
    if "seqlens_k" in inputs:
        total = inputs["seqlens_k"].astype(np.int64) + 1
        lengths = np.maximum(total - S, 0)
        chunk = np.tril(np.ones((S, S), bool))[None] & (np.arange(S)[None, None, :] < (total - lengths)[:, None, None])
        past = np.arange(int(lengths.max()))[None, :] < lengths[:, None]
        return int(lengths.max()), np.concatenate([np.broadcast_to(past[:, None], (B, S, past.shape[1])), chunk], axis=2)
    mask = np.array(inputs["attention_mask"])
    cap = inputs["past_key_0"].shape[2]
    lengths = np.array(inputs["position_ids"])[:, 0]
    P = int(lengths.max())
    out = np.zeros((B, S, P + S), bool)
    for b, n in enumerate(lengths):
        assert not mask[b, :, n:cap].any(), "a standard graph's mask shows positions past the row's length"
        out[b, :, :n] = mask[b, :, :n]
    out[:, :, P:] = mask[:, :, cap:]
    return P, out


def _record(pipe, monkeypatch) -> list:
    calls = []
    orig = Pipeline._run

    def rec(self, name, outputs=None, **inputs):
        keep = {k: np.array(v) for k, v in inputs.items() if k in ("attention_mask", "position_ids", "timestep", "und_features", "inputs_embeds")}
        if "past_key_0" in inputs:
            keep["past"], keep["attention_mask"] = _effective_mask(inputs)
            if "seqlens_k" in inputs:  # GroupQueryAttention's RoPE positions: each token's slot
                S = inputs["inputs_embeds"].shape[1]
                lengths = np.maximum(inputs["seqlens_k"].astype(np.int64) + 1 - S, 0)
                keep["position_ids"] = lengths[:, None] + np.arange(S)[None]
        res = orig(self, name, outputs, **inputs)
        if name.startswith("backbone") or name in ("gen_adapter", "und_adapter"):
            calls.append((name, keep, {k: np.array(v) for k, v in res.items() if k in ("image_embeds",)}))
        return res

    monkeypatch.setattr(Pipeline, "_run", rec)
    return calls


def test_edit_reference_goes_through_the_gen_branch_at_timestep_zero(tiny_bundle, tiny_reference, sd, monkeypatch):
    # brief: [reference image][instruction][noisy target]; reference fused (und + clean latent), timestep 0, Gen branch
    for name in CONFIGS:
        assert get_config(name).reference_branch == "gen", name
    tok = Pipeline.load(tiny_bundle).tokenizer
    sp = SpecialIds.from_tokenizer(tok)
    assert template.edit(sp, [97], True, "gen") == [
        Text((sp.im_start, sp.vision_start)), Image("reference", "gen"),
        Text((sp.vision_end, 97, sp.im_end, sp.vision_start)), Image("target", "gen")]

    p = Pipeline.load(tiny_bundle, cfg_mode="sequential")
    calls = _record(p, monkeypatch)
    img = np.random.default_rng(5).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    p.edit(img, "ab", noise=initial_noise(0, 8, 2, 2), steps=1)
    # the first adapter call is the reference: the Gen adapter, real understanding features, timestep 0
    name, feeds, outs = next(c for c in calls if c[0].endswith("adapter"))
    assert name == "gen_adapter" and float(feeds["timestep"][0]) == 0.0 and np.abs(feeds["und_features"]).sum() > 0
    # its tokens go through backbone_gen, bidirectional within the image
    bb = next(c for c in calls if c[0].startswith("backbone") and c[1]["inputs_embeds"].shape[1] == 4 and c[1]["past"] == 2)
    assert bb[0] == "backbone_gen"
    np.testing.assert_array_equal(bb[1]["inputs_embeds"], outs["image_embeds"])
    assert bb[1]["attention_mask"].all()
    # the reference model: the versatile expert's features, clean latents, timestep 0, Gen adapter
    with torch.no_grad():
        x = torch.from_numpy(img)
        feats, _ = tiny_reference.vision(x, expert=0)
        want = _gen_adapter(sd, feats.numpy(), tiny_reference.ae.encode(x).numpy(), 0.0, tiny_reference.cfg.timestep_freq_dim)
        assert _rel(tiny_reference.reference_tokens(x), want) < TOL
    # and the reference pipeline runs the reference's tokens in the Gen branch, the text in Und
    seen = []
    hook = tiny_reference.llm.register_forward_hook(lambda m, a, o: seen.append(a[2]))
    try:
        ref.edit(tiny_reference, tok, img, "ab", initial_noise(0, 8, 2, 2), steps=1)
    finally:
        hook.remove()
    assert seen[0].tolist() == [[0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0]]


# ---- attention masks ----------------------------------------------------------------------------------


def _table(rows: str) -> np.ndarray:
    return np.array([[c == "1" for c in r] for r in rows.split()], bool)


# "ab" is two byte-level tokens; tiny images of 64x64 are 2x2 = 4 tokens.
# understanding: [im_start vision_start][image x4][vision_end a b im_end assistant], all causal
MASK_UNDERSTAND = _table("""
10000000000
11000000000
11100000000
11110000000
11111000000
11111100000
11111110000
11111111000
11111111100
11111111110
11111111111
""")
# generation: [im_start a b im_end vision_start] causal, then the target's 4 tokens see everything
MASK_GENERATE = _table("""
100000000
110000000
111000000
111100000
111110000
111111111
111111111
111111111
111111111
""")
# editing: [im_start vision_start][reference x4][vision_end a b im_end vision_start][target x4]
MASK_EDIT = _table("""
100000000000000
110000000000000
111111000000000
111111000000000
111111000000000
111111000000000
111111100000000
111111110000000
111111111000000
111111111100000
111111111110000
111111111111111
111111111111111
111111111111111
111111111111111
""")


def _assemble(calls, n_prefix_chunks: int, target_index: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The full (N, N) mask and positions of one request from its backbone calls (B = 1)."""
    parts = [c for c in calls if c[0].startswith("backbone")]
    chunks = parts[:n_prefix_chunks] + ([parts[target_index]] if target_index is not None else [])
    n = sum(c[1]["inputs_embeds"].shape[1] for c in chunks)
    mask, pos = np.zeros((n, n), bool), np.full(n, -1)
    for _, f, _ in chunks:
        P, S = f["past"], f["inputs_embeds"].shape[1]
        mask[P:P + S, :P + S] = f["attention_mask"][0]
        pos[P:P + S] = f["position_ids"][0]
    return mask, pos


def test_runtime_masks_of_every_task_match_the_hand_written_ones(tiny_bundle, monkeypatch):
    p = Pipeline.load(tiny_bundle, cfg_mode="sequential")
    calls = _record(p, monkeypatch)
    img = np.random.default_rng(6).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)

    p.understand(img, "ab", max_new_tokens=3)
    mask, pos = _assemble(calls, 3, None)
    np.testing.assert_array_equal(mask, MASK_UNDERSTAND)
    np.testing.assert_array_equal(pos, np.arange(11))
    decode = [c for c in calls if c[0].startswith("backbone")][3:]
    assert len(decode) == 3
    for k, (name, f, _) in enumerate(decode):  # each decoded token sees everything before it and itself
        assert name == "backbone_und" and f["past"] == 11 + k and f["attention_mask"].all()
        assert f["position_ids"].tolist() == [[11 + k]]

    calls.clear()
    p.generate("ab", noise=initial_noise(0, 8, 2, 2), steps=1, cfg=1.0)
    mask, pos = _assemble(calls, 1, 1)
    np.testing.assert_array_equal(mask, MASK_GENERATE)
    np.testing.assert_array_equal(pos, np.arange(9))

    calls.clear()
    p.edit(img, "ab", noise=initial_noise(0, 8, 2, 2), steps=1)
    # prefixes run in order (full: 3 chunks, image only: 3, no reference: 1), then the step's target chunk per prefix
    mask, pos = _assemble(calls, 3, 7)
    np.testing.assert_array_equal(mask, MASK_EDIT)
    np.testing.assert_array_equal(pos, np.arange(15))


def test_batched_guidance_masks_pad_the_shorter_prefixes(tiny_bundle, monkeypatch):
    p = Pipeline.load(tiny_bundle, cfg_mode="batch")
    calls = _record(p, monkeypatch)
    img = np.random.default_rng(6).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    p.edit(img, "ab", noise=initial_noise(0, 8, 2, 2), steps=1)
    name, f, _ = [c for c in calls if c[0].startswith("backbone")][-1]
    # prefixes of 11 ([im_start vs][ref x4][ve a b im_end vs]), 9 (no instruction) and 3 (no reference) tokens
    assert name == "backbone_gen" and f["attention_mask"].shape == (3, 4, 15)
    want = np.zeros((3, 4, 15), bool)
    for b, n in enumerate((11, 9, 3)):
        want[b, :, :n] = True
        want[b, :, 11:] = True
    np.testing.assert_array_equal(f["attention_mask"], want)
    # each row's target continues right after its own prefix
    assert f["position_ids"].tolist() == [[11, 12, 13, 14], [9, 10, 11, 12], [3, 4, 5, 6]]


def test_reference_mask_rule_matches_the_hand_written_ones():
    from emma_export.model.backbone import full_mask

    none = -1
    und = torch.tensor([[none, none, 2, 2, 2, 2] + [none] * 5])
    gen = torch.tensor([[none] * 5 + [1] * 4])
    edit = torch.tensor([[none, none, 1, 1, 1, 1, none, none, none, none, none, 3, 3, 3, 3]])
    assert torch.equal(full_mask(und, False)[0], torch.from_numpy(MASK_UNDERSTAND))
    assert torch.equal(full_mask(gen, True)[0], torch.from_numpy(MASK_GENERATE))
    assert torch.equal(full_mask(edit, True)[0], torch.from_numpy(MASK_EDIT))


# ---- KV cache -----------------------------------------------------------------------------------------


def test_kv_cache_after_prefill_and_each_decode_step_equals_full_recomputation(pipe, tiny_reference):
    img = np.random.default_rng(7).uniform(-1, 1, (1, 3, 64, 96)).astype(np.float32)
    tr = StepTrace(keep_kv=True)
    out = pipe.understand(img, "what is this?", max_new_tokens=4, trace=tr)
    rtr = StepTrace(keep_kv=True)
    ref.understand(tiny_reference, pipe.tokenizer, torch.from_numpy(img), "what is this?", max_new_tokens=4, trace=rtr)
    assert len(out.token_ids) == 4 and len(tr.kv) == 5 == len(rtr.kv)
    sp = pipe.special
    segs = template.understand(sp, pipe.tokenizer.encode("what is this?", add_special_tokens=False).ids)
    prefix_len = 2 + 6 + 1 + len(segs[2].ids) - 1
    for k, ((keys, values), (rkeys, rvalues)) in enumerate(zip(tr.kv, rtr.kv)):
        # everything so far in ONE forward pass over the whole sequence (no cache), as the brief's mask rule says
        full = segs + ([Text(tuple(out.token_ids[:k]))] if k else [])
        pre, _ = ref.run_prefix(tiny_reference, full, {"input": torch.from_numpy(img)}, bidirectional=False)
        fk = torch.stack(pre.cache.keys, 0).permute(3, 0, 1, 2, 4)[:, :, 0].numpy()
        fv = torch.stack(pre.cache.values, 0).permute(3, 0, 1, 2, 4)[:, :, 0].numpy()
        assert keys.shape == fk.shape == (prefix_len + k, 4, 2, 16), (k, keys.shape, fk.shape)
        assert _rel(keys, fk) < 1e-5 and _rel(values, fv) < 1e-5, k
        assert _rel(rkeys, fk) < 1e-5 and _rel(rvalues, fv) < 1e-5, k
        # the newest position too (a stale or misplaced write shows there first)
        assert _rel(keys[-1], fk[-1]) < 1e-4 and _rel(values[-1], fv[-1]) < 1e-4, k
