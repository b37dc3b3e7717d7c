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
import csv
import sys
import time
from pathlib import Path
from typing import Any


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


def read_descriptions(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"descriptions CSV not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        if "description" not in cols or "scientific_name" not in cols:
            raise ValueError(f"{path}: needs columns scientific_name and description, has {cols}")
        out = {r["scientific_name"].strip(): r["description"].strip() for r in reader if r.get("description")}
    if not out:
        raise ValueError(f"{path}: no descriptions")
    return out


def analyze_checkpoint(ckpt: Path, args: argparse.Namespace, out: Path, name: str, device: str) -> dict[str, Any]:
    from bioclip_fast.analysis.emergent import inter_species_alignment, intra_species_metrics
    from bioclip_fast.analysis.plots import plot_projection
    from bioclip_fast.eval.datasets import load_eval_data
    from bioclip_fast.eval.zeroshot import class_name, encode_images, encode_texts
    from bioclip_fast.model import load_model

    model, preprocess, tokenizer, _ = load_model(ckpt, model_name=args.model_name, device=device)
    data = load_eval_data(args.data, split=args.split, preprocess=preprocess, model=model, tokenizer=tokenizer,
                          batch_size=args.batch_size, root=args.root, image_column=args.image_column,
                          label_column=args.label_column, num_workers=args.workers, device=device)
    enc = encode_images(model, data.loader, device=device, desc=f"analyze {name}: images",
                        progress=not args.no_progress)
    if enc["labels"] is None:
        raise ValueError(f"{args.data}: no species labels")
    names = [class_name(c) for c in data.classes]
    species = [names[i] for i in enc["labels"].tolist()]
    feats = enc["features"].numpy()
    skipped = list(enc.get("skipped", []))
    if data.rows is not None and enc.get("index") is not None:
        data.rows = [data.rows[i] for i in enc["index"]]  # rows of the images that were read, in feature order
    attrs = list(args.inter_attribute or []) + list(args.intra_attribute or [])
    if attrs and data.rows is None:
        raise ValueError(f"{args.data} carries no per-image metadata; attributes need a CSV or the bundled data")
    if data.rows is not None:
        missing = [a for a in attrs if a not in data.rows[0]]
        if missing:
            raise ValueError(f"attribute column(s) {missing} not in the data; columns: {sorted(data.rows[0])}")
    res: dict[str, Any] = {"checkpoint": str(ckpt), "data": data.description}
    res["intra"] = intra_species_metrics(feats, species, var_threshold=args.var_threshold)
    if len(set(species)) >= 3:
        from bioclip_fast.analysis.visual import plot_species_plane_3d

        variant = [r[args.intra_attribute[0]] for r in data.rows] if args.intra_attribute else None
        png3 = plot_species_plane_3d(feats, species, out / f"species_plane_3d_{_safe(name)}.png", variant=variant,
                                     title=f"{name}: species plane + orthogonal axis"
                                           + (f" ({args.intra_attribute[0]})" if variant else ""))
        res["intra"]["species_plane_png"] = png3.name
    for a in args.intra_attribute or []:
        m = intra_species_metrics(feats, species, [r[a] for r in data.rows], var_threshold=args.var_threshold)
        res[f"intra:{a}"] = {k: m[k] for k in ("fdr", "fdr_subspace", "fdr_full", "attribute_values",
                                                "n_attribute_images")}
    for a in args.inter_attribute or []:
        values = [r[a] for r in data.rows]
        res[f"inter:{a}"] = inter_species_alignment(feats, species, values, attribute_kind=args.attribute_kind,
                                                    n_permutations=args.permutations, seed=args.seed)
        png = plot_projection(feats, species, values, out / f"projection_{_safe(name)}_{_safe(a)}.png",
                              attribute_name=a, method=args.projection,
                              title=f"{name}: species coloured by {a} (Mantel ρ_s="
                                    f"{res[f'inter:{a}']['alignment']:.2f})")
        res[f"inter:{a}"]["projection_png"] = png.name
    if args.descriptions:
        desc = read_descriptions(args.descriptions)
        sp = [s for s in names if s in desc]
        if len(sp) < 3:
            print(f"warning: only {len(sp)} species have descriptions in {args.descriptions}; skipped",
                  file=sys.stderr)
        else:
            t = encode_texts(model, tokenizer, [desc[s] for s in sp], device=device).cpu().numpy()
            dist = 1.0 - t @ t.T
            res["inter:description"] = inter_species_alignment(
                feats, species, attribute_distance=dist, attribute_species=sp,
                n_permutations=args.permutations, seed=args.seed)
    from bioclip_fast.analysis.visual import PROTOCOLS, run_protocol

    for proto in PROTOCOLS:
        folder = getattr(args, proto)
        if folder:
            r = run_protocol(proto, model, preprocess, folder, out, name, device=device, batch_size=args.batch_size,
                             num_workers=args.workers, permutations=args.permutations, seed=args.seed,
                             var_threshold=args.var_threshold, progress=not args.no_progress)
            skipped += r.pop("skipped")
            res[f"visual:{proto}"] = r
    from bioclip_fast.eval.report import skipped_summary

    res["skipped_images"] = skipped_summary(skipped)
    return res


def _safe(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s)


def summary_row(name: str, r: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "species": r["intra"]["n_species"], "images": r["intra"]["n_images"],
                           "k": r["intra"]["k"], "ρ (intra in inter)": r["intra"]["rho"],
                           "ρ random": r["intra"]["rho_random"]}
    for key, v in r.items():
        if key.startswith("intra:"):
            row[f"FDR⊥ {key[6:]}"] = v["fdr"]
        elif key.startswith("inter:"):
            row[f"align {key[6:]}"] = v["alignment"]
            row[f"p {key[6:]}"] = v["p_value"]
    if "visual:fishnet" in r:
        row["align habitat (FishNet)"] = r["visual:fishnet"]["alignment"]
        row["NN same habitat (FishNet)"] = r["visual:fishnet"]["nn_habitat_agreement"]
    if "visual:finches" in r:
        row["|ρ_s| beak~PC1 (finches)"] = r["visual:finches"]["beak_pc1_spearman"]
    if "visual:newt" in r:
        row["ρ life stage (NeWT)"] = r["visual:newt"]["rho"]
        row["FDR⊥ life stage (NeWT)"] = r["visual:newt"]["fdr"]
        row["contrast ⊥ share (NeWT)"] = r["visual:newt"]["contrast_orthogonal_share"]
    row["skipped images"] = r.get("skipped_images", {}).get("count", 0)
    return row


PAPER_CLAIMS = [
    "Inter-species: the embedding distribution of species aligns with functional and ecological meaning — e.g. "
    "Darwin's finches arrange by beak size, FishNet freshwater and marine species separate (Fig. 1, habitat "
    "t-SNE). Evidence in the paper: plots. Ours: `align …` (Mantel ρ_s of species-mean distances vs attribute "
    "distances), `NN same habitat`, `|ρ_s| beak~PC1`.",
    "Intra-species: variation within a species (life stages, sexes) is preserved, not collapsed, and lies in "
    "subspaces orthogonal to inter-species distinctions, where it is better separated (NeWT life stages in 3-D). "
    "Ours: `ρ` (share of intra-species variance inside the inter-species subspace; lower = more orthogonal, read "
    "against `ρ random`), `FDR⊥` (separability in the orthogonal complement), `contrast ⊥ share`.",
    "Both properties grow with training-data scale (the paper compares models trained on more data). Compare your "
    "checkpoints in one table; the paper reports no values of our metrics to compare with.",
]


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
    from bioclip_fast.devices import resolve_device
    from bioclip_fast.cli.args import resolve_checkpoints
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
    results = {name: analyze_checkpoint(c, args, out, name, device) for name, c in zip(labels, ckpts)}
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
