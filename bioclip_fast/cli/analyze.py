"""`bioclip-fast analyze`: emergent properties of one or more checkpoints' image-embedding spaces.

Per model, our metrics (the BioCLIP 2 paper shows its evidence visually; these numbers are the package's own
quantification, see docs/emergent.md): the intra-species variance ratio ρ, the Fisher discriminant ratio of each
intra-species attribute in the orthogonal complement of the inter-species subspace, and the Mantel alignment of
species means with each inter-species attribute (and, optionally, with species descriptions embedded by the model's
own text tower). The paper's three visual protocols run from local dataset folders (``--fishnet``, ``--finches``,
``--newt``; :mod:`bioclip_fast.analysis.visual`). Writes ``analysis.json``, ``analysis.md`` (one row per model, the
paper's claims beside), ``comparison.png`` (a bar chart per metric), a 2-D projection per model and inter-species
attribute, a 3-D species-plane plot per model and each protocol's plot into ``--out``. Unreadable images are
skipped, counted and listed.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bioclip_fast.cli.args import add_checkpoint_arguments, add_data_arguments

    add_checkpoint_arguments(parser, multiple=True)
    add_data_arguments(parser)
    parser.set_defaults(split="all")
    parser.add_argument("--inter-attribute", action="append", default=None, metavar="COLUMN",
                        help="species-level attribute column (repeatable); default for butterflies: family")
    parser.add_argument("--intra-attribute", action="append", default=None, metavar="COLUMN",
                        help="attribute varying within species, e.g. sex or life_stage (repeatable)")
    parser.add_argument("--attribute-kind", default="auto", choices=("auto", "numeric", "categorical"),
                        help="how inter-species attribute values are compared")
    parser.add_argument("--descriptions", default=None,
                        help="CSV with scientific_name and description: Mantel alignment of species means with "
                             "the model's description embeddings (default for butterflies: the bundled file)")
    parser.add_argument("--var-threshold", type=float, default=0.95,
                        help="share of species-mean variance the inter-species subspace keeps")
    parser.add_argument("--permutations", type=int, default=999, help="Mantel permutations for the p-value")
    parser.add_argument("--projection", default="pca", choices=("pca", "tsne"))
    parser.add_argument("--fishnet", default=None, metavar="DIR",
                        help="FishNet folder: species t-SNE coloured freshwater vs marine (paper's habitat figure)")
    parser.add_argument("--finches", default=None, metavar="DIR",
                        help="folder with metadata.csv (filepath, species, beak_size): finches ordered by beak size")
    parser.add_argument("--newt", default=None, metavar="DIR",
                        help="NeWT folder: life stages in 3-D (species plane + orthogonal axis)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="analysis_results", help="output directory")


def validate(args: argparse.Namespace) -> None:
    from bioclip_fast.errors import UsageError

    if args.permutations < 0:
        raise UsageError(f"--permutations must be >= 0, got {args.permutations}")
    if not 0 < args.var_threshold <= 1:
        raise UsageError(f"--var-threshold must be in (0, 1], got {args.var_threshold}")
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")
    for flag in ("fishnet", "finches", "newt"):
        folder = getattr(args, flag)
        if folder and not Path(folder).is_dir():
            raise UsageError(f"--{flag} {folder}: not a directory")
    if args.descriptions and args.descriptions != "butterflies" and not Path(args.descriptions).is_file():
        raise UsageError(f"--descriptions {args.descriptions}: file not found")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")


def run(args: argparse.Namespace) -> int:
    from bioclip_fast.analysis.plots import plot_comparison
    from bioclip_fast.analysis.runner import PAPER_CLAIMS, AnalysisOptions, analyze_checkpoint, summary_row
    from bioclip_fast.devices import resolve_device
    from bioclip_fast.cli.args import image_set_options, resolve_checkpoints
    from bioclip_fast.eval.datasets import check_data_source
    from bioclip_fast.eval.report import markdown_table, write_json

    check_data_source(args.data)  # a shard spec that matches nothing fails before any model is loaded
    if args.data == "butterflies":
        if args.inter_attribute is None:
            args.inter_attribute = ["family"]
        if args.descriptions is None:
            from bioclip_fast.data.bundled import butterflies_root

            args.descriptions = str(butterflies_root() / "descriptions.csv")
    validate(args)
    device = str(resolve_device(args.device))  # before any work
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpts, labels = resolve_checkpoints(args.checkpoints)
    t0 = time.time()
    options = AnalysisOptions(
        **image_set_options(args), inter_attribute=tuple(args.inter_attribute or ()),
        intra_attribute=tuple(args.intra_attribute or ()), attribute_kind=args.attribute_kind,
        descriptions=args.descriptions, var_threshold=args.var_threshold, permutations=args.permutations,
        projection=args.projection, seed=args.seed, fishnet=args.fishnet, finches=args.finches, newt=args.newt)
    results = {name: analyze_checkpoint(c, options, out, name, device) for name, c in zip(labels, ckpts)}
    rows = [summary_row(n, r) for n, r in results.items()]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = markdown_table(rows, columns)
    plot_metrics = {n: {k: v for k, v in row.items() if k.startswith(("ρ (", "FDR", "align"))}
                    for n, row in zip(labels, rows)}
    png = plot_comparison(plot_metrics, out / "comparison.png")
    meta = {"device": device, "seconds": round(time.time() - t0, 2), "args": vars(args)}
    write_json(out / "analysis.json", {"meta": meta, "results": results})
    md = ["# Emergent-property analysis", "",
          f"Data: {results[labels[0]]['data']}. **Our metrics** (the package's own quantification, not numbers "
          "from the BioCLIP 2 paper): ρ: share of intra-species variance inside the inter-species subspace (lower "
          "= more orthogonal; 'ρ random' is a random subspace of the same size). FDR⊥: Fisher ratio of an "
          "intra-species attribute in the orthogonal complement (higher = better separated). align: Mantel "
          "Spearman correlation of species-mean distances with attribute distances, p: permutation p-value. "
          "Definitions: docs/emergent.md.", "", table, f"![comparison]({png.name})", "",
          "## The paper's claims (BioCLIP 2, arXiv 2505.23883), beside our metrics", ""]
    md += [f"- {c}" for c in PAPER_CLAIMS] + [""]
    pngs = [(n, k, v["png"]) for n, r in results.items() for k, v in r.items() if k.startswith("visual:")]
    pngs += [(n, "species plane", r["intra"]["species_plane_png"]) for n, r in results.items()
             if "species_plane_png" in r["intra"]]
    if pngs:
        md += ["## Plots", ""] + [f"- {n}, {k}: ![{k}]({p})" for n, k, p in pngs] + [""]
    from bioclip_fast.eval.report import skipped_markdown, warn_skipped

    for n, r in results.items():
        warn_skipped(n, r["skipped_images"])
    md += skipped_markdown({n: r["skipped_images"] for n, r in results.items()})
    (out / "analysis.md").write_text("\n".join(md))
    print(table)
    print(f"wrote {out / 'analysis.json'}, {out / 'analysis.md'}, {png}")
    return 0
