"""`emma-bench`: the PyTorch reference and the runtime, timed side by side in one run.

Every figure is a median over repeats after a warm-up (min and max kept). Ratios are speed-ups,
torch time / runtime time, so above 1 means the runtime is faster.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import click
import numpy as np
import torch

CONTEXTS = (64, 256, 1024, 2048)


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    repeats: int

    @classmethod
    def of(cls, fn: Callable[[], object], repeat: int, warmup: int = 1) -> "Timing":
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return cls(statistics.median(ts), min(ts), max(ts), repeat)


@dataclass
class BenchReport:
    config: str
    machine: dict
    torch: dict[str, Timing] = field(default_factory=dict)
    runtimes: dict[str, dict[str, Timing]] = field(default_factory=dict)  # bundle label -> metric -> timing
    decode_growth: dict[str, dict[int, float]] = field(default_factory=dict)  # who -> context -> s/token
    step_by_size: dict[str, dict[int, float]] = field(default_factory=dict)  # who -> image px -> s/step
    tokens: dict[str, dict[str, int]] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    cfg_modes: dict[str, float] = field(default_factory=dict)
    understand_tokens: dict[str, int] = field(default_factory=dict)  # who -> tokens decoded per understand
    # --peer (peer.bench_peer): the peer's build or why it was skipped; the bandwidth floor per context (s)
    peer: dict = field(default_factory=dict)
    floor: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        return d


def visual_token_table(cfg, sizes=((256, 256), (512, 512), (1024, 1024))) -> dict[str, dict[str, int]]:
    """Visual tokens per image fed to the backbone: EMMA's channel-wise fusion, BAGEL-style token-wise
    concatenation (ViT patch 14 tokens + 8x VAE latents in 2x2 patches), and an 8x AE with 2x2 patches."""
    out = {}
    for h, w in sizes:
        emma = cfg.num_visual_tokens(h, w)
        ae8 = (h // 16) * (w // 16)
        vit14 = (h // 14) * (w // 14)
        out[f"{h}x{w}"] = {"emma_channel_concat": emma, "ae8_patch2": ae8, "bagel_token_concat": vit14 + ae8,
                           "emma_edit_reference_and_target": 2 * emma, "bagel_edit_reference_and_target": vit14 + 2 * ae8}
    return out


class _TorchSide:
    """The PyTorch reference pipelines, eager."""

    def __init__(self, model, tokenizer):
        from .model import pipelines as ref

        self.ref = ref
        self.model = model
        self.tok = tokenizer

    def understand_prefill(self, image):
        sp = self.ref.SpecialIds.from_tokenizer(self.tok)
        segs = self.ref.template.understand(sp, self.ref.template.text_ids(self.tok, "describe the picture"))
        return self.ref.run_prefix(self.model, segs, {"input": torch.from_numpy(image)}, bidirectional=False)

    def understand(self, image, n):
        return self.ref.understand(self.model, self.tok, torch.from_numpy(image), "describe the picture", max_new_tokens=n)

    def generate(self, noise, steps):
        return self.ref.generate(self.model, self.tok, "a red circle left of a blue square", noise, steps=steps)

    def edit(self, image, noise, steps):
        return self.ref.edit(self.model, self.tok, torch.from_numpy(image), "make the circle green", noise, steps=steps)

    @torch.no_grad()
    def decode_step_at(self, ctx: int):
        from .model.backbone import UND, KVCache, chunk_mask

        l = self.model.cfg.llm
        g = torch.Generator().manual_seed(0)
        shape = (1, l.num_key_value_heads, ctx, l.head_dim)
        cache = KVCache([torch.randn(shape, generator=g) for _ in range(l.num_hidden_layers)],
                        [torch.randn(shape, generator=g) * 0.05 for _ in range(l.num_hidden_layers)])
        x = self.model.embed(torch.tensor([[65]]))
        allow = chunk_mask(torch.ones(1, ctx, dtype=torch.bool), 1, causal=True)
        pos = torch.tensor([[ctx]])

        @torch.inference_mode()  # the step runs after this factory returns: without it, autograd records it (2-3x slower)
        def step():
            h, _ = self.model.llm(x, pos, UND, allow, cache)
            return self.model.lm_head(h)

        return step

    def denoise_step_at(self, px: int):
        cfg = self.model.cfg
        sp = self.ref.SpecialIds.from_tokenizer(self.tok)
        segs = self.ref.template.split_prefix(self.ref.template.generate(sp, self.ref.template.text_ids(self.tok, "a red circle")))[0]
        prefix, _ = self.ref.run_prefix(self.model, segs, {}, True)
        g = cfg.grid(px, px)
        x = torch.randn(1, cfg.ae.latent_channels, *g)
        return torch.inference_mode()(lambda: self.ref.velocity(self.model, prefix, x, 0.5))


class _RuntimeSide:
    def __init__(self, bundle_dir, cfg_mode="batch"):
        from emma_runtime.pipelines import Pipeline

        self.p = Pipeline.load(bundle_dir, cfg_mode=cfg_mode)  # opens every session

    def understand_prefill(self, image):
        from emma_runtime import template

        segs = template.understand(self.p.special, self.p._prompt_ids("describe the picture"))
        return self.p.prefill(segs, {"input": image}, gen_task=False, extra=1)

    def understand(self, image, n):
        return self.p.understand(image, "describe the picture", max_new_tokens=n)

    def generate(self, noise, steps):
        d = self.p.dims
        return self.p.generate("a red circle left of a blue square", noise.shape[2] * d.cell, noise.shape[3] * d.cell, steps=steps, noise=noise)

    def edit(self, image, noise, steps):
        return self.p.edit(image, "make the circle green", steps=steps, noise=noise)

    def decode_step_at(self, ctx: int):
        from emma_runtime.kv_cache import KVCache

        d = self.p.dims
        cache = KVCache.allocate(self.p.backend, d, 1, ctx + 1, self.p.kv_dtype)
        rng = np.random.default_rng(0)
        for k, v in zip(cache.keys, cache.values):
            k[:, :, :ctx] = rng.standard_normal(k[:, :, :ctx].shape)
            v[:, :, :ctx] = 0.05 * rng.standard_normal(v[:, :, :ctx].shape)
        cache.commit(ctx)
        emb = self.p.embed([65])

        def step():  # a real step (its key/value written at position ctx), then the cache back to ctx
            h = self.p.run_chunk(cache, emb, "und", True)
            cache.lengths = np.full(1, ctx, np.int64)
            return self.p.logits(h)

        return step

    def denoise_step_at(self, px: int):
        from emma_runtime import template

        d = self.p.dims
        h = w = px // d.cell
        segs = template.split_prefix(template.generate(self.p.special, self.p._prompt_ids("a red circle")))[0]
        cache, _, _ = self.p.prefill(segs, {}, True, h * w)
        x = np.random.default_rng(0).standard_normal((1, d.latent_channels, h, w)).astype(np.float32)

        def step():
            emb = self.p.target_embeds(x, 0.5)
            hid = self.p.run_chunk(cache, emb, "gen", causal=False, commit=False)
            return self.p._run("gen_head", hidden_states=hid)

        return step


def run_bench(bundles: list[str], tasks: list[str], repeat: int, decode_tokens: int = 16, steps: int | None = None, contexts=CONTEXTS, sizes=(256, 512), progress=print,
              peer: str | None = None, peer_dir: str | None = None) -> BenchReport:
    from emma_runtime.bundle import Bundle

    from .config import EMMAConfig
    from .verify import reference_model
    from .verify_e2e import test_image

    first = Bundle.load(bundles[0])
    cfg = EMMAConfig.from_dict(first.manifest.config)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = reference_model(first)
    tok = first.tokenizer()
    rep = BenchReport(cfg.name, {"python": sys.version.split()[0], "torch": torch.__version__, "threads": torch.get_num_threads(),
                                 "cpu": platform.processor() or platform.machine()})
    try:
        import onnxruntime

        rep.machine["onnxruntime"] = onnxruntime.__version__
        rep.machine["ort_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        pass
    rep.machine["cuda"] = torch.cuda.is_available()
    rep.machine["gpu_backends"] = _gpu_backends()
    px = cfg.image_size
    gh, gw = cfg.grid(px, px)
    image = test_image(px, px)
    noise = np.random.default_rng(0).standard_normal((1, cfg.ae.latent_channels, gh, gw)).astype(np.float32)
    steps = steps or cfg.sampler.steps
    rep.tokens = visual_token_table(cfg)
    other_sizes = {}
    for size in sizes:
        if size != px and 2 * cfg.num_visual_tokens(size, size) + 64 < cfg.max_context:
            g = cfg.grid(size, size)
            other_sizes[size] = (test_image(size, size),
                                 np.random.default_rng(0).standard_normal((1, cfg.ae.latent_channels, *g)).astype(np.float32))
    if peer:
        from .peer.bench_peer import peer_contexts

        contexts = peer_contexts(contexts, cfg.max_context)

    sides: dict[str, object] = {"torch": _TorchSide(model, tok)}
    for b in bundles:
        label = f"{Bundle.load(b).manifest.precision}:{Path(b).name}"
        sides[label] = _RuntimeSide(b)
    for who, side in sides.items():
        progress(f"timing {who}")
        t: dict[str, Timing] = {}
        if "understand" in tasks:
            t["understand_prefill"] = Timing.of(lambda: side.understand_prefill(image), repeat)
            t["understand"] = Timing.of(lambda: side.understand(image, decode_tokens), repeat)
            # the same work on both sides or the ratio means nothing: greedy, so both stop at the same token
            rep.understand_tokens[who] = len(side.understand(image, decode_tokens).token_ids)
        if "generate" in tasks:
            t["denoise_step"] = Timing.of(side.denoise_step_at(px), repeat * 3)
            t["generate"] = Timing.of(lambda: side.generate(noise, steps), repeat)
        if "edit" in tasks:
            t["edit"] = Timing.of(lambda: side.edit(image, noise, steps), repeat)
        # the same tasks at the other image sizes (generate_512, edit_512): the paper's resolution
        for size, (img_s, noise_s) in other_sizes.items():
            if "generate" in tasks:
                t[f"generate_{size}"] = Timing.of(lambda: side.generate(noise_s, steps), repeat)
            if "edit" in tasks:
                t[f"edit_{size}"] = Timing.of(lambda: side.edit(img_s, noise_s, steps), repeat)
        growth = {}
        for ctx in contexts:
            if ctx + 1 > cfg.max_context:
                continue
            growth[ctx] = Timing.of(side.decode_step_at(ctx), repeat * 3).median_s
        rep.decode_growth[who] = growth
        rep.step_by_size[who] = {s: Timing.of(side.denoise_step_at(s), repeat * 2).median_s for s in sizes if cfg.num_visual_tokens(s, s) + 64 < cfg.max_context}
        if who == "torch":
            rep.torch = t
        else:
            rep.runtimes[who] = t

    if peer:
        from .peer.bench_peer import add_peer

        label = list(sides)[1]
        add_peer(rep, cfg, bundles[0], label, sides[label], peer, contexts, repeat, peer_dir, progress, model=model)

    # CFG branches: batched in one call vs one call per prefix (the runtime's two modes).
    if "generate" in tasks:
        for mode in ("batch", "sequential"):
            s = _RuntimeSide(bundles[0], cfg_mode=mode)
            rep.cfg_modes[mode] = Timing.of(lambda: s.generate(noise, steps), repeat).median_s
    rep.ratios = _ratios(rep)
    if peer:
        from .peer.bench_peer import peer_ratios

        rep.ratios.update(peer_ratios(rep, list(sides)[1]))
    return rep


def _gpu_backends() -> dict[str, object]:
    """What a GPU run could use here, recorded with every report (this CPU-only bench times none of it)."""
    out: dict[str, object] = {"torch_cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    try:
        import onnxruntime

        out["ort_cuda"] = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        out["ort_tensorrt"] = "TensorrtExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        out["ort_cuda"] = out["ort_tensorrt"] = False
    for mod in ("tensorrt", "tensorrt_rtx"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "yes")
        except Exception:  # noqa: BLE001 - absent or broken: either way not usable
            out[mod] = False
    return out


def _ratios(rep: BenchReport) -> dict[str, float]:
    r: dict[str, float] = {}
    labels = list(rep.runtimes)
    fp32 = next((l for l in labels if l.startswith("fp32:")), labels[0] if labels else None)
    if fp32:
        rt = rep.runtimes[fp32]
        sized = [k for k in rt if k.startswith(("generate_", "edit_"))]
        for task, key in (("understand", "understand"), ("generate", "generate"), ("edit", "edit"), ("understand_prefill", "understand_prefill"),
                          ("denoise_step", "denoise_step"), *[(k, k) for k in sized]):
            if key in rt and key in rep.torch:
                r[f"{task}_runtime_vs_torch"] = rep.torch[key].median_s / rt[key].median_s
        for who_steps in (rep.step_by_size.get(fp32, {}),):
            for size, sec in who_steps.items():
                if size in rep.step_by_size.get("torch", {}):
                    r[f"denoise_step_{size}_runtime_vs_torch"] = rep.step_by_size["torch"][size] / sec
        g = rep.decode_growth.get(fp32, {})
        tg = rep.decode_growth.get("torch", {})
        for ctx in sorted(set(g) & set(tg)):
            r[f"decode_{ctx}_runtime_vs_torch"] = tg[ctx] / g[ctx]
        g = rep.decode_growth.get(fp32, {})
        if g:
            lo, hi = min(g), max(g)
            r[f"decode_growth_{hi}_vs_{lo}"] = g[hi] / g[lo]
            if 2048 in g and 64 in g:  # the figure
                r["decode_growth_2048_vs_64"] = g[2048] / g[64]
        tg = rep.decode_growth.get("torch", {})
        if tg:
            lo, hi = min(tg), max(tg)
            r[f"torch_decode_growth_{hi}_vs_{lo}"] = tg[hi] / tg[lo]
    for l in labels:
        prec = l.split(":")[0]
        if prec != "fp32" and fp32:
            for key in ("generate", "understand"):
                if key in rep.runtimes[l] and key in rep.runtimes[fp32]:
                    r[f"{prec}_vs_fp32_{key}"] = rep.runtimes[fp32][key].median_s / rep.runtimes[l][key].median_s
            if "generate" in rep.runtimes[l]:
                r[f"{prec}_vs_fp32"] = r.get(f"{prec}_vs_fp32_generate", 0.0)
    if "batch" in rep.cfg_modes and "sequential" in rep.cfg_modes:
        r["cfg_batch_vs_sequential"] = rep.cfg_modes["sequential"] / rep.cfg_modes["batch"]
    return r


def plot(rep: BenchReport, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for who, g in rep.decode_growth.items():
        if g:
            xs = sorted(g)
            name = f"peer: {rep.peer.get('name')} {rep.peer.get('precision', '')}" if who == "peer" else who
            ax.plot(xs, [g[x] * 1e3 for x in xs], marker="o", label=name)
    if rep.floor:
        xs = sorted(rep.floor)
        gbs = rep.machine.get("read_bandwidth", {}).get("floor_uses_gbs", 0.0)
        ax.plot(xs, [rep.floor[x] * 1e3 for x in xs], "k--", label=f"floor (weights + KV at {gbs:.1f} GB/s)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode time per token (ms)")
    ax.set_title(f"EMMA {rep.config}: decode cost vs context")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax = axes[1]
    names = ["torch"] + list(rep.runtimes)
    vals = [rep.torch.get("generate").median_s if "generate" in rep.torch else 0] + [rep.runtimes[n]["generate"].median_s if "generate" in rep.runtimes[n] else 0 for n in rep.runtimes]
    ax.bar(range(len(names)), vals, color=["#888"] + ["#3a7"] * (len(names) - 1))
    ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    ax.set_ylabel("whole generation (s)")
    ax.set_title("text-to-image, lower is better")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _print(rep: BenchReport) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    t = Table(title=f"emma-bench ({rep.config}): median s [min-max]")
    t.add_column("metric")
    cols = ["torch"] + list(rep.runtimes)
    for col in cols:
        t.add_column(col, justify="right")
    metrics = list(rep.torch) or (list(next(iter(rep.runtimes.values()))) if rep.runtimes else [])
    for m in metrics:
        row = [m]
        for col in cols:
            tm = rep.torch.get(m) if col == "torch" else rep.runtimes[col].get(m)
            row.append(f"{tm.median_s:.4f} [{tm.min_s:.4f}-{tm.max_s:.4f}]" if tm else "-")
        t.add_row(*row)
    c.print(t)
    g = Table(title="decode s/token by context")
    g.add_column("who")
    ctxs = sorted({k for v in rep.decode_growth.values() for k in v})
    for x in ctxs:
        g.add_column(str(x), justify="right")
    for who, v in rep.decode_growth.items():
        g.add_row(who, *[f"{v[x] * 1e3:.2f} ms" if x in v else "-" for x in ctxs])
    if rep.floor:
        g.add_row("floor", *[f"{rep.floor[x] * 1e3:.2f} ms" if x in rep.floor else "-" for x in ctxs])
    c.print(g)
    if "read_bandwidth" in rep.machine:
        b = rep.machine["read_bandwidth"]
        c.print(f"read bandwidth: {b['single_gbs']:.1f} GB/s single thread, {b['multi_gbs']:.1f} GB/s over {b['threads']} threads")
    if rep.peer.get("skipped"):
        c.print(f"peer {rep.peer['name']} skipped: {rep.peer['skipped']}")
    s = Table(title="denoising step by image size")
    s.add_column("who")
    px = sorted({k for v in rep.step_by_size.values() for k in v})
    for x in px:
        s.add_column(f"{x}px", justify="right")
    for who, v in rep.step_by_size.items():
        s.add_row(who, *[f"{v[x] * 1e3:.1f} ms" if x in v else "-" for x in px])
    c.print(s)
    tk = Table(title="visual tokens per image fed to the backbone")
    tk.add_column("image")
    keys = list(next(iter(rep.tokens.values())))
    for k in keys:
        tk.add_column(k, justify="right")
    for size, v in rep.tokens.items():
        tk.add_row(size, *[str(v[k]) for k in keys])
    c.print(tk)
    for k, v in rep.ratios.items():
        c.print(f"ratio {k}: {v:.2f}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", "bundles", multiple=True, required=True, type=click.Path(), help="Bundle(s) to time; the first fixes the config.")
@click.option("--tasks", default="understand,generate,edit", show_default=True)
@click.option("--repeat", type=click.IntRange(1), default=3, show_default=True)
@click.option("--steps", type=click.IntRange(1), default=None, help="Denoising steps per generation (default: the config's).")
@click.option("--decode-tokens", type=click.IntRange(1), default=16, show_default=True)
@click.option("--json", "json_out", type=click.Path(), default=None)
@click.option("--plot", "plot_out", type=click.Path(), default=None, help="PNG of latency against context length.")
@click.option("--peer", type=click.Choice(["ort-genai"]), default=None,
              help="Also build the first bundle's Und branch with this peer (ONNX Runtime GenAI's model builder) and time its decode at 64-4096 tokens of context, with the memory-bandwidth floor.")
@click.option("--peer-dir", type=click.Path(file_okay=False), default=None, help="Keep the peer's Qwen3 folder and build here (default: a temporary folder).")
def main(bundles, tasks, repeat, steps, decode_tokens, json_out, plot_out, peer, peer_dir):
    """Time the PyTorch reference and the runtime side by side; print ratios (torch time / runtime time)."""
    from emma_runtime.bundle import BundleError

    try:
        rep = run_bench(list(bundles), tasks.split(","), repeat, decode_tokens, steps, progress=lambda m: click.echo(m, err=True),
                        peer=peer, peer_dir=peer_dir)
    except BundleError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    _print(rep)
    if json_out:
        Path(json_out).write_text(json.dumps(rep.to_dict(), indent=2, default=str))
    if plot_out:
        plot(rep, plot_out)
        click.echo(f"plot: {plot_out}")


if __name__ == "__main__":
    main()
