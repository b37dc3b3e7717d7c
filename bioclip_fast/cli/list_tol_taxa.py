"""`bioclip-fast list-tol-taxa`: pybioclip's list-tol-taxa, the TreeOfLife species table's taxa as CSV (streamed)."""
from __future__ import annotations

import argparse
import csv

from bioclip_fast.cli.args import add_model_arguments
from bioclip_fast.cli.image_io import open_text_output
from bioclip_fast.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--tol-embeddings", default=None, metavar="DIR",
                        help="folder with txt_emb_species.npy/json (default: the model's TreeOfLife table)")
    parser.add_argument("--output", default="stdout", help="CSV file (default: stdout)")


def run(args: argparse.Namespace) -> int:
    from bioclip_fast import hub
    from bioclip_fast.tol import LABEL_COLUMNS, TaxaNames, find_table

    if args.model_name and not args.model:
        args.model = args.model_name
    if args.tol_embeddings:
        _, names_file = find_table(args.tol_embeddings)
    else:
        model_str = args.model or hub.BIOCLIP_MODEL_STR
        repo = hub.TOL_MODELS.get(model_str)
        if repo is None:
            raise UsageError(f"--model {model_str}: not a TreeOfLife model ({', '.join(hub.TOL_MODELS)}); "
                             f"pass --tol-embeddings DIR")
        snap = hub.hf_snapshot(repo, repo_type="dataset", files=hub.TOL_EMBEDDINGS)
        names_file = snap / hub.TOL_EMBEDDINGS[1]
    names = TaxaNames.from_json(names_file)
    out, close = open_text_output(args.output)
    try:
        w = csv.writer(out, lineterminator="\n")
        w.writerow(LABEL_COLUMNS)
        for i in range(len(names)):
            row = names.classification(i, 6)
            w.writerow([row[c] for c in LABEL_COLUMNS])
    finally:
        if close:
            out.close()
    return 0

