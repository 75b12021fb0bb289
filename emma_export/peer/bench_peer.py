"""`emma-bench --peer`: a peer decoder's curve, the memory-bandwidth floor and their ratios, added to a
BenchReport in the same run as the runtime's figures."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from .floor import DecodeBytes, measure_bandwidth

PEERS = ("ort-genai",)
PEER_CURVE = "peer"  # its key in BenchReport.decode_growth
PEER_CONTEXTS = (64, 256, 512, 1024, 2048, 4096)
ROUNDS = 3  # alternating rounds of the runtime's and the peer's decode steps per context


def peer_contexts(contexts, max_context: int) -> tuple[int, ...]:
    """The bench's contexts and the peer's (64 to 4096). A step at context ``c`` needs ``c + 1``
    positions of the runtime's cache, so a context past ``max_context - 1`` is timed at that instead."""
    return tuple(sorted({min(c, max_context - 1) for c in (*contexts, *PEER_CONTEXTS)}))


def add_peer(rep, cfg, bundle_dir: str, runtime_label: str, runtime_side, peer: str, contexts, repeat: int,
             work_dir: str | None = None, progress: Callable[[str], object] = print, model=None) -> None:
    """Fills ``rep.machine['read_bandwidth']``, ``rep.floor`` (per context of the runtime's curve),
    ``rep.peer`` and, when the peer builds, ``rep.decode_growth['peer']``, timed alternating with the
    runtime's decode (:func:`paired_decode`), whose curve those paired figures replace. A peer that
    cannot be built here is recorded (and printed) with its reason; the floor is still measured."""

    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; choose one of {', '.join(PEERS)}")
    progress("measuring read bandwidth")
    bw = measure_bandwidth()
    rep.machine["read_bandwidth"] = bw.to_dict()
    precision = runtime_label.split(":")[0]
    kv = getattr(getattr(runtime_side, "p", None), "kv_dtype", None)
    touched = DecodeBytes.of(cfg, precision, kv.itemsize if kv is not None else 4)
    rep.floor = {c: touched.floor_s(c, bw.best) for c in rep.decode_growth.get(runtime_label, {})}
    rep.peer = {"name": peer, "against": runtime_label, "bytes_per_step": asdict(touched)}

    from . import ort_genai

    with tempfile.TemporaryDirectory(prefix="emma-peer-") as tmp:
        work = Path(work_dir) if work_dir else Path(tmp)
        progress(f"building peer {peer} ({precision}) in {work}")
        try:
            built = ort_genai.prepare(bundle_dir, work, model)
        except ort_genai.PeerError as e:
            rep.peer["skipped"] = str(e)
            progress(f"peer {peer} skipped: {e}")
            return
        import onnxruntime_genai

        rep.peer.update(version=onnxruntime_genai.__version__, precision=built.build.precision,
                        build_s=built.build.seconds, command=" ".join(built.build.command[1:]))
        progress(f"timing peer {peer} against {runtime_label}, alternating")
        per_round = max(3, repeat)
        ours, theirs = {}, {}
        for c in rep.decode_growth.get(runtime_label, {}):
            rt, pt = paired_decode(runtime_side.decode_step_at(c), built.decoder.decode_step_at(c, ROUNDS * per_round + 2), per_round)
            ours[c], theirs[c] = rt.median_s, pt.median_s
        # the paired figures replace the runtime's first pass: both curves then saw the same machine load
        rep.decode_growth[runtime_label] = ours
        rep.decode_growth[PEER_CURVE] = theirs
        del built  # the session holds the model files open until it goes


def paired_decode(ours: Callable[[], object], theirs: Callable[[], object], per_round: int, rounds: int | None = None):
    """Both decoders timed step by step in alternating rounds (``per_round`` steps each), so a change in
    the machine's load (another process on these cores) lands on both; returns their Timings over
    every step. ``theirs`` is warmed with two calls (ONNX Runtime GenAI's first only picks a token)."""
    import statistics
    import time

    from ..bench import Timing

    ours()
    theirs()
    theirs()
    a, b = [], []
    for _ in range(rounds or ROUNDS):
        for fn, ts in ((ours, a), (theirs, b)):
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
    return tuple(Timing(statistics.median(ts), min(ts), max(ts), len(ts)) for ts in (a, b))


def peer_ratios(rep, runtime_label: str) -> dict[str, float]:
    """decode_vs_peer_<ctx>: peer time / runtime time (above 1: the runtime is faster);
    decode_vs_floor_<ctx> and peer_vs_floor_<ctx>: time / floor (1 is the floor, lower is better)."""
    r: dict[str, float] = {}
    rt = rep.decode_growth.get(runtime_label, {})
    pc = rep.decode_growth.get(PEER_CURVE, {})
    for c, t in sorted(rt.items()):
        if c in pc:
            r[f"decode_vs_peer_{c}"] = pc[c] / t
        if c in rep.floor:
            r[f"decode_vs_floor_{c}"] = t / rep.floor[c]
            if c in pc:
                r[f"peer_vs_floor_{c}"] = pc[c] / rep.floor[c]
    if pc:
        lo, hi = min(pc), max(pc)
        r[f"peer_decode_growth_{hi}_vs_{lo}"] = pc[hi] / pc[lo]
    return r


__all__ = ["PEERS", "PEER_CURVE", "PEER_CONTEXTS", "ROUNDS", "peer_contexts", "add_peer", "paired_decode", "peer_ratios"]
