"""``emma-export init``: an EMMA checkpoint folder initialised from Qwen3, SigLIP and DC-AE checkpoints.

Initialisation follows the paper: both branches of every LLM layer start from the same Qwen3 layer
(the shallow layers' shared Q/K too), both understanding experts from SigLIP's last layers, the DC-AE
is copied, and the adapters, timestep MLP, router and Gen head are fresh (``weights.init.init_tensor``,
the Gen head projection zero). Where each tensor comes from is ``weights/keymap.py``.

Memory stays bounded: the plan (names, shapes, dtypes) is known before any tensor is read, so every
shard's safetensors header is written first and each upstream tensor is then read (plain reads, no
mmap), written to each of its EMMA places and dropped. Peak memory is about one upstream tensor
(plus its cast), whatever the model size.

Output folder: ``config.json`` (EMMAConfig), ``model.safetensors`` or ``model-0000i-of-0000n.safetensors``
shards, ``model.safetensors.index.json`` (always) and the LLM folder's ``tokenizer.json``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from .config import SPECIAL_TOKENS, EMMAConfig
from .weights.init import init_tensor
from .weights.keymap import KeyPlan, build_plan, emma_shapes
from .weights.upstream import TORCH_TO_ST, EmmaChoices, UpstreamError, UpstreamSet, check_tied_lm_head, resolve_config

__all__ = ["DEFAULT_SHARD_BYTES", "InitReport", "ShardedSafetensorsWriter", "init_checkpoint", "init_model", "peak_rss_bytes"]

DEFAULT_SHARD_BYTES = 2 * 1024**3
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INDEX_NAME = "model.safetensors.index.json"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- streaming safetensors writer ------------------------------------------------------------------


class ShardedSafetensorsWriter:
    """Writes tensors whose names, dtypes and shapes are declared up front, in the declared order,
    into shards of at most ``shard_bytes`` (a larger tensor gets a shard of its own). Headers are
    written when a shard is opened; tensor bytes go straight to the file."""

    def __init__(
        self,
        out_dir: str | Path,
        entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        size = 0
        for name, dtype, shape in entries:
            if dtype not in TORCH_TO_ST:
                raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
            n = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + n > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, tuple(shape), n))
            size += n
        self.shards = [s for s in shards if s]
        k = len(self.shards)
        self.names = ["model.safetensors"] if k == 1 else [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
        self.order = [(i, e) for i, s in enumerate(self.shards) for e in s]
        self.pos = 0
        self.fh = None
        self.cur = -1
        self.total = sum(e[3] for _, e in self.order)
        self.written = 0

    def _open(self, i: int) -> None:
        if self.fh is not None:
            self.fh.close()
        header: dict = {"__metadata__": self.metadata}
        off = 0
        for name, dtype, shape, n in self.shards[i]:
            header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.fh = open(self.out_dir / self.names[i], "wb")
        self.fh.write(struct.pack("<Q", len(raw)))
        self.fh.write(raw)
        self.cur = i

    @property
    def next_name(self) -> str | None:
        return self.order[self.pos][1][0] if self.pos < len(self.order) else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.pos >= len(self.order):
            raise ValueError(f"tensor {name!r}: every declared tensor is already written")
        i, (want, dtype, shape, n) = self.order[self.pos]
        if name != want:
            raise ValueError(f"tensor {name!r} written out of order (expected {want!r})")
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"tensor {name!r}: got {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {shape}"
            )
        if i != self.cur:
            self._open(i)
        t = tensor.detach().contiguous().reshape(-1)
        if t.numel():
            self.fh.write(memoryview(t.view(torch.uint8).numpy()))
        self.pos += 1
        self.written += n

    def close(self) -> dict:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        if self.pos != len(self.order):
            raise ValueError(f"{len(self.order) - self.pos} declared tensor(s) were not written, first {self.next_name!r}")
        index = {
            "metadata": {"total_size": self.total},
            "weight_map": {e[0]: self.names[i] for i, e in self.order},
        }
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return index


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---- init -----------------------------------------------------------------------------------------


@dataclass
class InitReport:
    out: str
    config: str
    tensors: int
    bytes: int
    shards: list[str]
    plan: dict[str, int]
    dropped: dict[str, int]
    lm_head: str
    tokenizer_warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _plan(ups: UpstreamSet, cfg: EMMAConfig) -> tuple[KeyPlan, dict[str, tuple[int, ...]]]:
    shapes = emma_shapes(cfg)
    return build_plan(cfg, ups.shapes(), shapes), shapes


def _check_tokenizer(path: Path, cfg: EMMAConfig) -> list[str]:
    """tokenizer.json must parse and fit the vocabulary; EMMA's special tokens missing -> warnings."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UpstreamError(f"{path}: not a tokenizer.json ({e})") from None
    ids: dict[str, int] = {}
    vocab = (data.get("model") or {}).get("vocab") or {}
    if isinstance(vocab, dict):
        ids.update({k: int(v) for k, v in vocab.items() if isinstance(v, int)})
    for t in data.get("added_tokens") or []:
        ids[t["content"]] = int(t["id"])
    if ids and max(ids.values()) >= cfg.llm.vocab_size:
        tok, i = max(ids.items(), key=lambda kv: kv[1])
        raise UpstreamError(f"{path}: token {tok!r} has id {i}, outside the vocabulary of {cfg.llm.vocab_size}")
    missing = [t for t in SPECIAL_TOKENS if t not in ids]
    return [f"tokenizer.json lacks EMMA special token {t}: added to the checkpoint's copy" for t in missing]


def _write_tokenizer(src: Path, dst: Path, cfg: EMMAConfig) -> None:
    """Copy the LLM's tokenizer, adding EMMA's special tokens it lacks (Qwen3 has no <|pad|> or
    <|assistant|>): they take the next free ids, which the embedding (vocab_size rows) must cover."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(src))
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens(missing)
        top = max(tok.token_to_id(t) for t in missing)
        if top >= cfg.llm.vocab_size:
            raise UpstreamError(f"{src}: adding {missing} needs id {top}, outside the vocabulary of {cfg.llm.vocab_size}")
        tok.save(str(dst))
    else:
        shutil.copyfile(src, dst)


def _stream(
    plan: KeyPlan,
    shapes: dict[str, tuple[int, ...]],
    ups: UpstreamSet,
    seed: int,
    dtype: torch.dtype | None,
) -> tuple[list[tuple[str, torch.dtype, tuple[int, ...]]], Callable]:
    """Declared entries in write order, and a generator of (name, tensor) in that order."""
    entries = []
    for m in plan.mapped:
        src = ups.folder(m.source)
        dt = dtype if dtype is not None and src.dtype(m.key).is_floating_point else src.dtype(m.key)
        entries += [(t, dt, shapes[t]) for t in m.targets]
    fresh_dt = dtype or torch.float32
    entries += [(k, fresh_dt, shapes[k]) for k in plan.fresh]

    def tensors():
        for m in plan.mapped:
            t = ups.folder(m.source).get(m.key)
            if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)
            for name in m.targets:
                yield name, t
            del t
        for k in plan.fresh:
            yield k, init_tensor(k, shapes[k], torch.float32, seed, zero_gen_head=True).to(fresh_dt)

    return entries, tensors


def init_checkpoint(
    llm_dir: str | Path,
    vision_dir: str | Path,
    ae_dir: str | Path,
    config_name: str | None,
    out_dir: str | Path,
    seed: int = 0,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    choices: EmmaChoices | None = None,
) -> InitReport:
    """Write an EMMA checkpoint folder initialised from the three upstream folders.

    ``config_name``: the EMMA config the upstream configs must match (None: the first that does, else
    one derived from the upstream configs with ``choices``, see ``weights.upstream.resolve_config``).
    The config is written as the checkpoint's ``config.json``; every later command reads it from there.
    ``dtype``: None keeps each upstream tensor's dtype (fresh tensors fp32); "fp32"/"bf16"/"fp16" casts all.
    The folder appears atomically: it is written next to ``out_dir`` and renamed when complete.
    """
    t0 = time.perf_counter()
    from .export.out_dir import check_out, replace_dir

    out = check_out(out_dir, "checkpoint", overwrite)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)} or None")
    td = DTYPES[dtype] if dtype else None

    ups = UpstreamSet.open(llm_dir, vision_dir, ae_dir)
    tok = ups.llm.path / "tokenizer.json"
    if not tok.exists():
        raise UpstreamError(
            f"Qwen3 (--llm) folder {ups.llm.path} has no tokenizer.json; the EMMA checkpoint needs the LLM's tokenizer"
        )
    cfg = resolve_config(ups, config_name, choices)
    tok_warnings = _check_tokenizer(tok, cfg)
    plan, shapes = _plan(ups, cfg)
    lm_head_note = check_tied_lm_head(ups.llm)
    entries, tensors = _stream(plan, shapes, ups, seed, td)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        writer = ShardedSafetensorsWriter(tmp, entries, shard_bytes)
        step, mark = 2**30, 2**30  # report every GiB written
        for name, t in tensors():
            writer.write(name, t)
            if progress is not None and writer.written >= mark:
                progress(f"{writer.written / 2**30:.0f}/{writer.total / 2**30:.1f} GiB written")
                mark = (writer.written // step + 1) * step
        writer.close()
        (tmp / "config.json").write_text(cfg.to_json())
        _write_tokenizer(tok, tmp / "tokenizer.json", cfg)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    dropped: dict[str, int] = {}
    for d in plan.dropped:
        dropped[f"{d.source}: {d.reason}"] = dropped.get(f"{d.source}: {d.reason}", 0) + 1
    return InitReport(
        out=str(out),
        config=cfg.name,
        tensors=len(entries),
        bytes=writer.total,
        shards=list(writer.names),
        plan=plan.summary(),
        dropped=dropped,
        lm_head=lm_head_note,
        tokenizer_warnings=tok_warnings,
        seconds=time.perf_counter() - t0,
        peak_rss_bytes=peak_rss_bytes(),
    )


def init_model(
    llm_dir: str | Path,
    vision_dir: str | Path,
    ae_dir: str | Path,
    config_name: str | None = None,
    seed: int = 0,
    choices: EmmaChoices | None = None,
):
    """The same initialisation as :func:`init_checkpoint`, in memory (fp32): the EMMA model
    ``load_checkpoint(init_checkpoint(...))`` returns, without writing anything."""
    from .model.emma import EMMA
    from .weights.init import materialize

    ups = UpstreamSet.open(llm_dir, vision_dir, ae_dir)
    cfg = resolve_config(ups, config_name, choices)
    plan, shapes = _plan(ups, cfg)
    check_tied_lm_head(ups.llm)
    sources = plan.sources()
    last: dict[str, torch.Tensor] = {}

    def read(name: str) -> torch.Tensor:
        if name in sources:
            src, key = sources[name]
            if (src, key) not in last:
                last.clear()
                last[(src, key)] = ups.folder(src).get(key)
            return last[(src, key)].clone()
        return init_tensor(name, shapes[name], torch.float32, seed, zero_gen_head=True)

    with torch.device("meta"):
        model = EMMA(cfg)
    return materialize(model, seed, zero_gen_head=True, source=read).eval()
