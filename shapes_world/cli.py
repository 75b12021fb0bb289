"""`emma-export train-shapes` and `emma-export evaluate`: the shapes world (issue #10)."""

from __future__ import annotations

import sys

import click

from emma_runtime.cli_support import Finite

from emma_export.cli.app import fail as _fail
from emma_export.cli.app import main


@main.command("train-shapes")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for model.safetensors (fp16), tokenizer.json, config.json, train.json.")
@click.option("--minutes", type=Finite(), default=15.0, show_default=True, help="Time budget, split between the autoencoder and the joint stage.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--ae-share", type=Finite(), default=0.35, show_default=True, help="Fraction of the budget for the autoencoder.")
@click.option("--ae-steps", type=click.IntRange(1), default=None, help="Fixed autoencoder steps instead of a time budget (repeatable runs).")
@click.option("--steps", type=click.IntRange(1), default=None, help="Fixed joint steps instead of a time budget (repeatable runs).")
@click.option("--dec-share", type=Finite(), default=0.0, show_default=True, help="Fraction of the budget for a decoder-only fine-tune at the end (encoder frozen).")
@click.option("--decoder-from", type=click.Path(exists=True, file_okay=False), default=None,
              help="Only fine-tune the autoencoder's decoder of this trained checkpoint for --minutes (every other weight, "
                   "and so every latent, stays as it is) and write the result to --out.")
@click.option("--dec-latent-noise", type=Finite(), default=0.0, show_default=True,
              help="Decoder stage: train on z + this * std_c(z) noise, for latents a sampler lands slightly off.")
@click.option("--joint-from", type=click.Path(exists=True, file_okay=False), default=None,
              help="Continue the joint stage of this trained checkpoint for --minutes (or --steps), the autoencoder "
                   "frozen, and write the result to --out.")
@click.option("--lr", type=Finite(), default=None, help="Peak learning rate of the joint stage (default: 1.5e-3; lower it for --joint-from).")
@click.option("--batch", "batch", type=(int, int, int), default=None, metavar="UND GEN EDIT",
              help="Rows per joint step for understanding, generation and editing (default: 24 20 20).")
@click.option("--average", type=Finite(), default=0.0, show_default=True,
              help="With --joint-from: save the exponential moving average of the weights at this decay (e.g. 0.999).")
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True, help="torch intra-op threads.")
@click.option("--quiet", is_flag=True, help="No progress bars; log lines instead.")
def train_shapes(out, minutes, seed, ae_share, ae_steps, steps, dec_share, dec_latent_noise, decoder_from, joint_from, lr, batch, average, threads, quiet):
    """Train the `shapes` EMMA on the generated world: autoencoder, then understanding,
    generation and editing together (then, with --dec-share, the decoder alone)."""
    from pathlib import Path

    from .train import TrainSettings, finetune_decoder, finetune_joint, train

    if decoder_from and joint_from:
        _fail("give one of --decoder-from and --joint-from")
    if dec_latent_noise < 0:
        _fail("--dec-latent-noise must be at least 0")
    if not 0.0 <= average < 1.0:
        _fail("--average must be at least 0 and below 1")
    if average and not joint_from:
        _fail("--average applies to --joint-from only")
    if batch is not None and (min(batch) < 0 or sum(batch) < 1):
        _fail("--batch needs three row counts >= 0, not all 0")
    if joint_from and minutes <= 0 and steps is None:
        _fail("--minutes must be positive (or give --steps)")
    if minutes <= 0 and not joint_from and (ae_steps is None or steps is None or decoder_from):
        _fail("--minutes must be positive" + ("" if decoder_from else " (or give both --ae-steps and --steps)"))
    if not 0.0 < ae_share < 1.0:
        _fail("--ae-share must be between 0 and 1")
    if not 0.0 <= dec_share < 1.0 - ae_share:
        _fail("--dec-share must be at least 0 and leave time for the joint stage (below 1 - --ae-share)")
    s = TrainSettings(minutes=minutes, seed=seed, ae_share=ae_share, ae_steps=ae_steps, steps=steps, dec_share=dec_share,
                      threads=threads, progress=not quiet)
    s.dec_latent_noise = dec_latent_noise
    if lr is not None:
        s.lr = lr
    if batch is not None:
        s.batch_und, s.batch_gen, s.batch_edit = batch
    for src in (decoder_from, joint_from):
        for name in ("model.safetensors", "tokenizer.json", "config.json"):
            if src and not (Path(src) / name).is_file():
                _fail(f"{src}: no {name} (expected a train-shapes output folder)")
    if joint_from:
        rec = finetune_joint(joint_from, out, s, average=average, echo=click.echo)
        click.echo(f"wrote {out}/model.safetensors, tokenizer.json, config.json, train.json (joint {rec['steps']} steps"
                   + (f", EMA {average}" if average else "") + ")")
        return
    if decoder_from:
        rec = finetune_decoder(decoder_from, out, s, echo=click.echo)
        click.echo(f"wrote {out}/model.safetensors, tokenizer.json, config.json, train.json "
                   f"(decoder {rec['steps']} steps, val PSNR {rec['val_psnr_before']:.2f} -> {rec['val_psnr_after']:.2f} dB)")
        return
    rep = train(out, s, echo=click.echo)
    size = (rep.out / "model.safetensors").stat().st_size
    click.echo(
        f"wrote {rep.out}/model.safetensors ({size / 1e6:.2f} MB fp16), tokenizer.json, config.json, train.json "
        f"in {rep.seconds / 60:.1f} min (autoencoder {rep.ae_steps} steps, joint {rep.steps} steps)"
    )


@main.command("evaluate")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--reference", is_flag=True, help="Also run the PyTorch reference on the bundle's source checkpoint.")
@click.option("--checkpoint", type=click.Path(exists=True), default=None, help="Reference weights (default: the manifest's source checkpoint).")
@click.option("--n", "n", type=click.IntRange(1), default=100, show_default=True, help="Held-out scenes.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--split", type=click.Choice(["heldout", "val"]), default="heldout", show_default=True,
              help="val: scenes of the training distribution, to separate generalisation from learning.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the full results as JSON.")
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True, help="torch threads for the reference.")
@click.option("--quiet", is_flag=True)
def evaluate_cmd(bundle_dir, reference, checkpoint, n, seed, split, json_out, threads, quiet):
    """Held-out shapes-world suite: understanding, generation, editing, autoencoder PSNR."""
    from emma_runtime.bundle import BundleError

    from .evaluate import evaluate, print_table, write_json

    if n < 1:
        _fail("--n must be at least 1")
    if reference and threads:
        import torch

        torch.set_num_threads(threads)
    try:
        res = evaluate(bundle_dir, n=n, seed=seed, reference=reference, checkpoint=checkpoint, progress=not quiet and sys.stderr.isatty(), split=split)
    except (BundleError, ValueError) as e:
        _fail(str(e))
    print_table(res, echo=click.echo)
    if json_out:
        write_json(res, json_out)
        click.echo(f"wrote {json_out}")


@main.command("world")
@click.option("--split", type=click.Choice(["train", "val", "heldout"]), default="heldout", show_default=True)
@click.option("--index", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG of the scene; each edit's target is written beside it as <stem>.edit<k>.png.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Caption, questions and answers, edit instructions.")
def world_cmd(split, index, seed, out, json_out):
    """Render one scene of the shapes world with its caption, questions (and answers) and edits:
    prompts and images to try `emma-run` on, with the answers it should give."""
    import json
    from pathlib import Path

    from PIL import Image

    from . import world

    ex = world.make_example(split, index, seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ex.image).save(out)
    click.echo(f"{out}: {split} scene {index} (seed {seed})")
    click.echo(f"caption: {ex.caption_detailed}")
    for qa in ex.qas:
        click.echo(f"question: {qa.question}  ->  {qa.answer}")
    edits = []
    for k, e in enumerate(ex.edits):
        tgt = out.with_name(f"{out.stem}.edit{k}.png")
        Image.fromarray(world.render(e.target_scene)).save(tgt)
        click.echo(f"edit: {e.instruction}  ->  {tgt}")
        edits.append({"instruction": e.instruction, "op": e.op, "target": str(tgt)})
    if json_out:
        Path(json_out).write_text(json.dumps({
            "split": split, "index": index, "seed": seed, "image": str(out), "caption": ex.caption,
            "caption_detailed": ex.caption_detailed,
            "questions": [{"question": q.question, "answer": q.answer, "type": q.qtype} for q in ex.qas],
            "edits": edits}, indent=2) + "\n")
