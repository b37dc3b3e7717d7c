"""Every command line in the ```bash blocks of README.md and of the manual's pages (docs/*.md) is run here, as
written, with small data substituted for paths.

How it works: `readme_commands()` extracts the commands of one file (backslash continuations joined, `#` comments
dropped); `DOC_FILES` lists the files read, and a command shown in several of them (the README's cluster example is
also in docs/training.md) runs once.
`RUNNERS` maps a regex on the command to a runner that substitutes small data for the README's paths (a regex
table `SUBSTITUTIONS` and per-runner maps), may append flags that only shrink the run (`--max-steps`, a tiny
`--model`, small batches, `--nproc-per-node 1`), and runs it: `bioclip-fast ...` in-process through
`bioclip_fast.cli.main` (asserting exit 0), `torchrun ...` and `make ...` as subprocesses.

A command that no runner matches FAILS `test_every_readme_command_has_a_runner` (so neither the README nor the
manual can show a command nobody runs). To register a new one:

1. write `def run_<name>(argv: list[str], ctx: Ctx) -> None` that maps the README's placeholder paths to small data
   (`ctx` has temp dirs, the bundled butterfly shards/images, foreign TreeOfLife-layout shards, a trained tiny model,
   see `Ctx`), runs the command and asserts on its output files;
2. add `(r"^bioclip-fast <subcommand>\\b", run_<name>)` to `RUNNERS` (first match wins; keep patterns specific).

Keep runners tiny (a few seconds each): the whole suite runs on 2 CPU cores. `make test` is checked, not run (it
would run this suite recursively): its recipe must be `python -m pytest` and `.ci/run` must call it. `make train` runs
its recipe's last command with `--max-steps` appended. A command whose realistic run needs another test file's
fixtures is `covered_by` that test, which must read the page the command is shown on (or spell its flags).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bioclip_fast.cli import main

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
# the README and every page of the manual (docs/architecture.md included: a command shown there runs too)
DOC_FILES = [README] + sorted((REPO / "docs").glob("*.md"))


def readme_commands(text: str | None = None) -> list[str]:
    """Command lines of the README's ```bash blocks (continuations joined, comments and blank lines dropped)."""
    text = README.read_text() if text is None else text
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                cmds.append(shlex.join(tokens))
    return cmds


def doc_commands() -> dict[str, list[str]]:
    """Every command of README.md and docs/*.md, in the order shown (README first), mapped to the files showing it."""
    out: dict[str, list[str]] = {}
    for path in DOC_FILES:
        for cmd in readme_commands(path.read_text(encoding="utf-8")):
            out.setdefault(cmd, []).append(str(path.relative_to(REPO)))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# shared small data
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Ctx:
    tmp: Path  # a fresh temp dir per command
    shared: Path  # module-wide temp dir with the data below
    tol: Path  # 4 foreign TreeOfLife-layout shards shard-000000..000003.tar (no manifest, no index)
    laion: Path  # replay shards 00000.tar, 00001.tar (.jpg + .txt)
    csv: Path  # a 20-row metadata CSV of bundled butterflies (image paths relative to `images`)
    images: Path  # the bundled butterfly image root
    image_dir: Path  # a folder of 4 images (predict/embed)
    pretrained: Path  # a bioclip-nano checkpoint file (stands in for the laion2b ViT-L-14 weights)
    trained_dir: Callable[[], Path]  # the suite's trained tiny model run dir (built on first use)
    eval_csv: Path  # 104 bundled butterflies (about 10 per species), absolute image paths, + analysis columns


@pytest.fixture(scope="module")
def shared(tmp_path_factory, request):
    from bioclip_fast.data import bundled
    from bioclip_fast.data.bundled import build_bundled_replay
    from bioclip_fast.data.shards import read_metadata
    from bioclip_fast.data.synthetic import write_tol_shards

    d = tmp_path_factory.mktemp("readme")
    write_tol_shards(d / "tol", 4, 6)
    build_bundled_replay(d / "laion-src", samples_per_shard=40)
    (d / "laion").mkdir()
    for i, p in enumerate(sorted((d / "laion-src").glob("*.tar"))[:2]):
        shutil.copy(p, d / "laion" / f"{i:05d}.tar")
    root = bundled.butterflies_root()
    rows = read_metadata(root / "metadata.csv")[::41][:20]
    csv = d / "my_metadata.csv"
    cols = ["image", "kingdom", "phylum", "class", "order", "family", "genus", "species", "scientific_name",
            "common_name"]
    csv.write_text("\n".join([",".join(cols)] + [",".join(r[c] for c in cols) for r in rows]) + "\n")
    (d / "images").mkdir()
    for r in rows[:4]:
        shutil.copy(root / r["image"], d / "images" / Path(r["image"]).name)
    from bioclip_fast.model import create_model, save_model

    pre = d / "ViT-L-14-laion2b_s32b_b82k.bin"
    save_model(pre, create_model("bioclip-nano"))
    # a benchmark-like CSV (absolute image paths) with a species-level attribute per family and two per-image ones
    all_rows = read_metadata(root / "metadata.csv")
    eval_rows = all_rows[::8]
    habitat = {f: ("meadow", "forest")[i % 2] for i, f in enumerate(sorted({r["family"] for r in all_rows}))}
    extra = ["habitat", "wing_length", "sex"]
    lines = [",".join(cols + extra)]
    for i, r in enumerate(eval_rows):
        row = dict(r, image=str(root / r["image"]))
        lines.append(",".join([row[c] for c in cols] + [habitat[r["family"]], f"{30 + (i * 7) % 11}",
                                                        ("female", "male")[i % 2]]))
    eval_csv = d / "eval_metadata.csv"
    eval_csv.write_text("\n".join(lines) + "\n")
    return Ctx(tmp=d, shared=d, tol=d / "tol", laion=d / "laion", csv=csv, images=root, image_dir=d / "images",
               pretrained=pre, trained_dir=lambda: request.getfixturevalue("trained_model_dir"), eval_csv=eval_csv)


# README placeholder path -> small data (regex on one argv token; first match wins)
def _substitute(argv: list[str], ctx: Ctx, extra: dict[str, str] | None = None) -> list[str]:
    table = {
        r"^/tol200m/shard-\{000000\.\.\d+\}\.tar$": f"{ctx.tol}/shard-{{000000..000003}}.tar",
        r"^/laion/\{00000\.\.\d+\}\.tar$": f"{ctx.laion}/{{00000..00001}}.tar",
        r"^/scratch/tol-index$": str(ctx.shared / "tol-index"),
        r"^[\w.-]*laion2b[\w.-]*\.bin$": str(ctx.pretrained),
        r"^my_metadata\.csv$": str(ctx.csv),
        r"^/data/[\w/-]+\.csv$|^my\.csv$": str(ctx.eval_csv),
        r"^my_images/?$": str(ctx.images),
        r"^images/$": str(ctx.image_dir),
        r"^shards/$": str(ctx.tmp / "shards"),
        r"^runs/[\w<>.-]+$": str(ctx.tmp / "run"),
        r"^runs/[\w<>-]+/model\.pt$": None,  # a trained model (resolved lazily: it takes a minute)
        r"^embeddings\.parquet$": str(ctx.tmp / "embeddings.parquet"),
        **(extra or {}),
    }
    out = []
    for tok in argv:
        for pat, rep in table.items():
            if re.match(pat, tok):
                tok = str(ctx.trained_dir() / "model.pt") if rep is None else rep
                break
        out.append(tok)
    return out


def _main(argv: list[str]) -> None:
    assert argv[0] == "bioclip-fast", argv
    rc = main(argv[1:])
    assert rc == 0, f"exit {rc}: {shlex.join(argv)}"


# ---------------------------------------------------------------------------------------------------------------------
# runners
# ---------------------------------------------------------------------------------------------------------------------
def run_make(argv: list[str], ctx: Ctx) -> None:
    target = argv[1]
    # under `make test` (CI) the environment carries MAKELEVEL/MAKEFLAGS: a nested make would then print
    # "make[1]: Entering/Leaving directory" lines around the recipe
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")}
    dry = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=REPO, capture_output=True, text=True,
                         env=env)
    assert dry.returncode == 0, dry.stderr
    last = dry.stdout.strip().splitlines()[-1]
    if target == "test":  # running it here would run this suite recursively: check the recipe and CI instead
        assert re.fullmatch(r"\S*python -m pytest", last), last
        assert "make test" in (REPO / ".ci" / "run").read_text()
        return
    assert target == "train" and last.endswith("bioclip-fast train"), last
    # the demo as written, shortened to 3 of its steps (its default schedule is step-clocked: 550 steps)
    cmd = shlex.split(last) + ["--max-steps", "3", "--no-progress", "--eval-templates", "simple", "--out",
                               str(ctx.tmp / "run")]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "zero-shot" in res.stdout and (ctx.tmp / "run" / "model.pt").is_file()
    cfg = json.loads((ctx.tmp / "run" / "config.json").read_text())
    assert (cfg["schedule_clock"], cfg["max_minutes"]) == ("steps", None) and ": 3 steps, about" in res.stderr


def run_make_shards(argv: list[str], ctx: Ctx) -> None:
    _main(_substitute(argv, ctx) + ["--no-progress"])
    manifest = json.loads((ctx.tmp / "shards" / "manifest.json").read_text())
    assert manifest["num_samples"] == 20 and (ctx.tmp / "shards" / "bioclip_index.json").is_file()


def run_index_shards(argv: list[str], ctx: Ctx) -> None:
    _main(_substitute(argv, ctx) + ["--no-progress"])
    m = json.loads((ctx.shared / "tol-index" / "bioclip_index.json").read_text())
    assert m["num_samples"] == 24


def _train_shrink(print_config: bool) -> list[str]:
    if print_config:
        return []
    return ["--model", "bioclip-nano", "--max-steps", "2", "--batch-size-per-gpu", "8",
            "--replay-batch-size-per-gpu", "4", "--precision", "fp32", "--num-workers", "0", "--no-progress",
            "--no-eval-at-end", "--save-every", "0", "--shuffle-buffer", "16"]


def run_torchrun_train(argv: list[str], ctx: Ctx) -> None:
    if "--index-dir" in argv and not (ctx.shared / "tol-index" / "bioclip_index.json").exists():
        run_index_shards(["bioclip-fast", "index-shards", "/tol200m/shard-{000000..000003}.tar", "--out",
                          "/scratch/tol-index"], ctx)
    cmd = _substitute(argv, ctx)
    i = cmd.index("--nproc-per-node")
    cmd[i + 1] = "1"  # one CPU process stands in for 8 GPUs
    cmd = [str(Path(sys.executable).parent / "torchrun")] + cmd[1:] + _train_shrink(False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=ctx.tmp, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    out = ctx.tmp / "run"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["preset"] == "bioclip2" and cfg["grad_checkpointing"] is True
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert len([m for m in metrics if "loss" in m]) == 2 and all("loss_replay" in m for m in metrics if "loss" in m)


def run_train(argv: list[str], ctx: Ctx) -> None:
    if "--index-dir" in argv and not (ctx.shared / "tol-index" / "bioclip_index.json").exists():
        run_index_shards(["bioclip-fast", "index-shards", "/tol200m/shard-{000000..000003}.tar", "--out",
                          "/scratch/tol-index"], ctx)
    pc = "--print-config" in argv
    _main(_substitute(argv, ctx) + _train_shrink(pc))


def run_eval(argv: list[str], ctx: Ctx) -> None:
    cmd = _substitute(argv, ctx)
    if "--out" not in cmd:
        cmd += ["--out", str(ctx.tmp / "eval")]
    for flag, value in (("--templates", "simple"), ("--folds", "2")):  # shrink: 1 template instead of 80, 2 folds
        if flag not in cmd and _accepts(cmd, flag):
            cmd += [flag, value]
    _main(cmd + ["--no-progress"] if "--no-progress" not in cmd and _accepts(cmd, "--no-progress") else cmd)


def run_predict_embed(argv: list[str], ctx: Ctx) -> None:
    _main(_substitute(argv, ctx))
    if argv[1] == "embed":
        assert (ctx.tmp / "embeddings.parquet").is_file()


def run_analyze_own_data(argv: list[str], ctx: Ctx) -> None:
    """docs/emergent.md's own-data command: its run directories are the suite's trained model, its CSV the butterflies
    with a species-level `habitat`, a per-image `wing_length` and `sex`."""
    argv = [str(ctx.trained_dir()) if re.fullmatch(r"runs/\w+", a) else a for a in argv]
    cmd = _substitute(argv, ctx, {r"^analysis/$": str(ctx.tmp / "analysis")})
    _main(cmd + ["--permutations", "9"] + (["--no-progress"] if _accepts(cmd, "--no-progress") else []))
    res = json.loads((ctx.tmp / "analysis" / "analysis.json").read_text())
    text = json.dumps(res)
    assert all(k in text for k in ("habitat", "wing_length", "sex")), text[:2000]


def _accepts(cmd: list[str], flag: str) -> bool:
    from bioclip_fast.cli import COMMANDS

    import argparse
    import importlib

    module = importlib.import_module(COMMANDS[cmd[1]][0])
    p = argparse.ArgumentParser()
    (module.add_arguments_for(cmd[1], p) if hasattr(module, "add_arguments_for") else module.add_arguments(p))
    return any(flag in a.option_strings for a in p._actions)


def covered_by(test_file: str, test_name: str) -> Callable[[list[str], Ctx], None]:
    """A command whose realistic run needs the fixtures of another test file (a hub-snapshot model and species table in
    a fake offline HF cache, benchmark folders in their published layouts, a preempted run, a package download): that
    test runs it. The runner checks that the test exists and that it either reads a page showing the command
    (README.md or docs/<page>.md, by file name) or spells every flag of the command, so the two cannot drift apart."""

    def run(argv: list[str], ctx: Ctx) -> None:
        source = (REPO / test_file).read_text()
        assert f"def {test_name}(" in source, f"{test_file}::{test_name} is gone; it ran the documented command {argv}"
        shown_in = COMMANDS.get(shlex.join(argv), [])
        reads_page = any(Path(page).name in source for page in shown_in)
        flags = [a.split("=", 1)[0] for a in argv if a.startswith("--")]
        missing = [f for f in flags if f not in source]
        assert reads_page or not missing, (f"{test_file}::{test_name} reads none of {shown_in} and does not run the "
                                           f"flags {missing}")

    run.__name__ = f"covered_by[{test_file}::{test_name}]"
    return run


RUNNERS: list[tuple[str, Callable[[list[str], Ctx], None]]] = [
    # run as written by other test files (the most specific patterns first)
    (r"^bioclip-fast eval --suite\b", covered_by("tests/test_eval_suite.py", "test_suite_readme_command")),
    (r"^bioclip-fast analyze .*--(fishnet|finches|newt)\b",
     covered_by("tests/test_analysis_visual.py", "test_analyze_demo_model_on_butterflies_and_the_three_protocols")),
    (r"^bioclip-fast (predict|embed) images/ (--model|--rank)|^bioclip-fast (list-tol-taxa|list-models|export)\b",
     covered_by("tests/test_pybioclip_parity.py", "test_readme_predict_commands_run_as_written")),
    (r"^bioclip-fast train --out runs/demo\b",
     covered_by("tests/test_train_faults.py", "test_readme_preemption_commands_run_as_written")),
    (r"^bash benchmarks/gpu_check\.sh .*--dry-run$",
     covered_by("tests/test_loss_gpu_check.py", "test_readme_dry_run_prints_the_time_boxed_plan")),
    (r"^bash benchmarks/gpu_check\.sh ",
     covered_by("tests/test_loss_gpu_check.py", "test_readme_command_without_gpu_exits_3_with_one_line")),
    (r"^make offline-bundle\b",
     covered_by("tests/test_offline_bundle.py", "test_make_offline_bundle_as_documented_installs_with_no_index")),
    (r"^python tools/pack_offline_host\.py --list$",
     covered_by("tests/test_offline_bundle.py", "test_list_as_documented_pins_every_group")),
    (r"^bioclip-fast analyze --checkpoint runs/\w+ --checkpoint runs/\w+ --data my\.csv\b", run_analyze_own_data),
    (r"^make (train|test)$", run_make),
    (r"^bioclip-fast make-shards\b", run_make_shards),
    (r"^bioclip-fast index-shards\b", run_index_shards),
    (r"^torchrun .*-m bioclip_fast train\b", run_torchrun_train),
    (r"^bioclip-fast train\b", run_train),
    (r"^bioclip-fast (eval|analyze)\b", run_eval),
    (r"^bioclip-fast (predict|embed)\b", run_predict_embed),
]


def _runner_for(cmd: str):
    return next((fn for pat, fn in RUNNERS if re.search(pat, cmd)), None)


COMMANDS = doc_commands()


def test_readme_has_commands_and_extraction_is_exact():
    assert len(COMMANDS) >= 5 and "make test" in COMMANDS and "make train" in COMMANDS
    assert all(page.startswith(("README.md", "docs/")) for pages in COMMANDS.values() for page in pages)
    sample = "```bash\nfoo --a 'x y' \\\n    --b 2   # note\n# only a comment\n\nbar\n```\n```python\nnot_me\n```"
    assert readme_commands(sample) == ["foo --a 'x y' --b 2", "bar"]


def test_every_readme_command_has_a_runner():
    missing = {c: pages for c, pages in COMMANDS.items() if _runner_for(c) is None}
    assert not missing, ("documented commands that no test runs (register a runner in tests/test_readme.py, see its "
                         f"docstring): {missing}")


@pytest.mark.parametrize("cmd", list(COMMANDS), ids=[f"{COMMANDS[c][0]}: {c[:60]}" for c in COMMANDS])
def test_readme_command_runs(cmd, shared, tmp_path, monkeypatch):
    runner = _runner_for(cmd)
    if runner is None:
        pytest.fail(f"no runner for the command {cmd!r} of {COMMANDS[cmd]}")
    monkeypatch.chdir(tmp_path)
    runner(shlex.split(cmd), dataclasses.replace(shared, tmp=tmp_path))


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+\s+(.*?)\s*$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower().replace("`", "")).replace(" ", "-") for h in heads}


def test_links_between_the_pages_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists and, with `#…`, one of its headings."""
    broken = []
    for page in DOC_FILES:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and anchor not in _anchors(dest.read_text(encoding="utf-8")):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, broken
