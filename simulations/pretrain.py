"""Pretrain a model on public data without privacy; the federation then starts from it.

    python -m simulations.pretrain --preset lm-pretrained --out pretrained/lm-shakespeare.pt
    python -m simulations.launch --preset lm-pretrained --num-sites 4     # DP fine-tuning from it

The run config is built as the launcher builds it (pyproject.toml's settings, the preset, then
``--set`` overrides) so that the model file fits the federated job of the same preset: the
server refuses a file whose family, architecture, tokenizer or data shape differ
(``task.init-from``). The public data are ``data.public-plays`` whole Shakespeare plays that no
site holds and the server never evaluates on (``common.data.site.public_dataset``). Prints the
held-out perplexity and next-token accuracy of the pretrained model and its CPU time.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from common.config import ConfigError, parse_run_config
from common.logs import setup_logging
from server.pretrain import pretrain
from simulations.benchlib import load_run_config, parse_sets
from simulations.launch import ROOT


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="lm-pretrained", help="a simulations/<name>.toml preset (default lm-pretrained)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one run-config key (repeatable)")
    ap.add_argument("--steps", type=int, default=4000, help="training steps of train.batch-size windows (default 4000)")
    ap.add_argument("--lr", type=float, default=0.002, help="pretraining's learning rate (default 0.002; the "
                    "preset's train.lr is the fine-tuning's)")
    ap.add_argument("--batch-size", type=int, default=32, help="pretraining's batch of windows (default 32)")
    ap.add_argument("--out", type=Path, help="the model file to write (default: the preset's task.init-from)")
    args = ap.parse_args(argv)
    setup_logging()
    raw = load_run_config(args.preset, parse_sets(args.overrides))
    out = args.out or Path(str(raw.get("task.init-from") or ""))
    if not str(out) or str(out) == ".":
        raise SystemExit("say where to write the model: --out PATH (the preset names no task.init-from)")
    if not out.is_absolute():
        out = ROOT / out
    raw["task.init-from"] = ""  # pretraining starts from fresh weights; the output is what init-from will name
    raw.update({"train.lr": args.lr, "train.batch-size": args.batch_size})  # the run config's are the fine-tuning's
    try:
        cfg = parse_run_config(raw)
    except ConfigError as err:
        raise SystemExit(str(err)) from None
    logging.getLogger(__name__).info("pretraining with %s", args.preset)
    metrics = pretrain(cfg, args.steps, out)
    print(json.dumps({"out": str(out), **metrics}, indent=1))
    return metrics


if __name__ == "__main__":
    main()
