"""``fedgen generate``: synthetic data from a run's model, written where a site or an analyst
(or a downstream benchmark) reads it.

The model is read back by ``server.run_model`` (final model or one round's checkpoint) and
sampled only through its family's ``sample``; this module checks the request and writes the
samples: PNGs in a folder, one ``.npz`` archive, or a ``.txt`` file. It imports torch only
inside the command, so the other commands stay quick to start.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from cli.options import JsonOpt, RunArg, RunsDirOpt
from cli.output import emit_json, fail
from server.runs_index import resolve_run

if TYPE_CHECKING:
    from server.run_model import Batch

__all__ = ["generate_cmd"]

# A PNG that `generate` writes: 00000.png, 00001.png, ... (more digits past 99,999 samples).
_PNG_NAME = re.compile(r"\d{5,}\.png")


def _output_format(output: Path, kind: str, family: str) -> str:
    """``png`` (a folder), ``npz`` or ``txt`` from ``-o``'s form, or the one-line error."""
    suffix = output.suffix.lower()
    if kind == "text":
        if suffix == ".txt":
            return "txt"
        raise fail(f"the {family} model writes text: give -o a .txt file, not {str(output)!r}")
    if suffix == ".npz":
        return "npz"
    if suffix == "" or output.is_dir():
        return "png"
    raise fail(f"the {family} model draws images: give -o a folder (PNGs) or a .npz file, not {str(output)!r}")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_output(output: Path, fmt: str, force: bool, run_dir: Path) -> None:
    """Writes nothing into the run folder; never replaces a non-empty output without --force."""
    if _inside(output.resolve(), run_dir.resolve()):
        raise fail(f"{output} is inside the run folder {run_dir}; generate writes nothing there: choose another path")
    if fmt == "png":
        if output.exists() and not output.is_dir():
            raise fail(f"{output} is a file; PNGs go into a folder (or give a .npz file)")
        if output.is_dir() and any(output.iterdir()) and not force:
            raise fail(f"{output} is not empty; use --force to write into it (its generated PNGs are replaced)")
    else:
        if output.is_dir():
            raise fail(f"{output} is a folder; give a file name ending in .{fmt}")
        if output.exists() and output.stat().st_size and not force:
            raise fail(f"{output} exists; use --force to overwrite it")


def _clear_generated(folder: Path) -> None:
    """Remove the PNGs an earlier `generate` wrote (NNNNN.png, <class>/NNNNN.png) and class folders
    it leaves empty, so that a smaller N does not leave stale images behind; nothing else."""
    if not folder.is_dir():
        return
    for path in list(folder.iterdir()):
        if path.is_file() and _PNG_NAME.fullmatch(path.name):
            path.unlink()
        elif path.is_dir() and path.name.isdigit():
            for png in path.iterdir():
                if png.is_file() and _PNG_NAME.fullmatch(png.name):
                    png.unlink()
            if not any(path.iterdir()):
                path.rmdir()


def _png_writer(folder: Path, n: int, num_classes: int):
    """Writes each batch's images as PNGs: ``<folder>/<class>/<index in class>.png`` when
    conditional (class folders zero-padded so that they sort as numbers), else ``<folder>/<index>.png``."""
    from PIL import Image

    digits = max(5, len(str(n - 1)))
    class_digits = len(str(num_classes - 1)) if num_classes else 0
    folder.mkdir(parents=True, exist_ok=True)

    def write(batch: Batch) -> None:
        for offset, image in enumerate(batch.samples):
            i = batch.start + offset
            if batch.labels is None:
                path = folder / f"{i:0{digits}d}.png"
            else:  # classes in turn: sample i is number i // K of its class
                cls = folder / f"{int(batch.labels[offset]):0{class_digits}d}"
                cls.mkdir(exist_ok=True)
                path = cls / f"{i // num_classes:0{digits}d}.png"
            # uint8 (H, W): greyscale; (H, W, 3 or 4): RGB or RGBA (other channel counts are refused before)
            Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(path)

    return write


def generate_cmd(
    run: RunArg,
    num: Annotated[int, typer.Option("--num-samples", "-n", metavar="N", help="How many samples to draw.",
                                     show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="PATH", show_default=False,
                                         help="Images: a folder (PNGs) or FILE.npz; text: FILE.txt.")],
    round_: Annotated[Optional[int], typer.Option("--round", "-r", min=0, metavar="K",
                                                  help="The checkpoint of round K instead of the final model.")]
    = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Same seed (and --batch-size), same samples.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples drawn at a time (bounds memory).")] = 256,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing non-empty output.")] = False,
    runs_dir: RunsDirOpt = Path("runs"),
    json_out: JsonOpt = False,
) -> None:
    """Draw N synthetic samples from a run's model and write them to PATH.

    RUN is a run id, a unique prefix of one, or 'latest'. The model is the run's final model,
    or with --round K its checkpoint of round K. Images go to a folder of PNGs
    (PATH/<class>/00000.png when the model is class-conditional, the classes balanced;
    PATH/00000.png otherwise) or to one PATH.npz (images: N x C x H x W uint8, and labels when
    conditional); text goes to PATH.txt, the samples separated by a '---' line. Uses CUDA when
    there is a device, else the CPU.

    Sampling is post-processing of the DP-trained model: it costs no privacy budget. It reads
    the run folder and writes nothing into it.
    """
    if num < 1:
        raise fail(f"-n must be at least 1, got {num}")
    if batch_size < 1:
        raise fail(f"--batch-size must be at least 1, got {batch_size}")
    run_dir = resolve_run(runs_dir, run)

    from common import atomic
    from server.run_model import draw, load_run_model, npz_bytes  # torch and flwr: only here

    output = output.expanduser()
    model = load_run_model(run_dir, round_)
    task = model.task
    fmt = _output_format(output, task.spec.kind, task.family)
    if fmt == "png" and task.spec.channels not in (1, 3, 4):
        raise fail(f"{task.spec.channels}-channel images have no PNG form; give -o a .npz file")
    _check_output(output, fmt, force, run_dir)

    batches = draw(task, num, seed, batch_size)
    counts: dict[int, int] = {}
    if fmt == "png":
        if force:
            _clear_generated(output)
        write = _png_writer(output, num, task.num_classes)
        for batch in batches:
            write(batch)
            _count(counts, batch)
    else:
        parts = list(batches)
        for batch in parts:
            _count(counts, batch)
        if fmt == "txt":
            from server.evaluation import TEXT_SEPARATOR  # as the server's per-round samples

            data = TEXT_SEPARATOR.join(text for b in parts for text in b.samples).encode("utf-8")
        else:
            data = npz_bytes(parts)
        atomic.write_bytes(output, data)

    path = output.resolve()
    summary = {"run_id": run_dir.name, "model": model.source, "model_path": str(model.path.resolve()), "family": task.family,
               "n": num, "seed": seed, "batch_size": batch_size, "format": fmt, "output": str(path),
               "class_counts": {str(c): counts[c] for c in sorted(counts)} if counts else None}
    if json_out:
        emit_json(summary)
        return
    what = "texts" if fmt == "txt" else "images"
    classes = f", {len(counts)} classes ({min(counts.values())}-{max(counts.values())} each)" if counts else ""
    typer.echo(f"{num} {what} from run {run_dir.name} ({model.source}, seed {seed}{classes}) -> {path}")


def _count(counts: dict[int, int], batch: Batch) -> None:
    if batch.labels is not None:
        for label in batch.labels.tolist():
            counts[label] = counts.get(label, 0) + 1
