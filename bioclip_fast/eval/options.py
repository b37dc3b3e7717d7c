"""The settings of an evaluation run (:func:`bioclip_fast.eval.runner.evaluate_checkpoint`,
:func:`bioclip_fast.eval.suite.run_suite`), one typed record instead of the command line's namespace. Defaults are
`bioclip-fast eval`'s; the command builds one from its flags after checking them."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ImageSetOptions:
    """The labelled images a model is run over and how to read them (what
    :func:`bioclip_fast.eval.datasets.load_eval_data` takes), and how the model is loaded; shared by
    :class:`EvalOptions` and :class:`bioclip_fast.analysis.runner.AnalysisOptions`."""

    data: str | Path = "butterflies"
    split: str = "val"
    root: str | Path | None = None
    image_column: str | None = None
    label_column: str | None = None
    batch_size: int = 64
    workers: int = 0
    model_name: str | None = None  # open_clip architecture of a plain state dict
    progress: bool = True


@dataclass(frozen=True)
class EvalOptions(ImageSetOptions):
    # the labelled images: ImageSetOptions (one data set; the suite reads its benchmarks from data_root instead)
    debug: bool = False  # re-raise a failing task / benchmark instead of recording it and going on
    # the tasks
    train_data: str | Path | None = None
    text_types: str | Sequence[str] = "taxonomic_common"
    templates: str = "bioclip2"
    shots: Sequence[int] = (1, 5)
    folds: int = 5
    fewshot_protocol: str = "reference"
    seed: int = 0
    # the BioCLIP 2 suite
    data_root: str | Path | None = None
    runs: int | None = None
    epochs: int = 50
    probe_batch_size: int = 256
    lr_fishnet: float = 1e-4
    lr_awa2: float = 1e-5
    probe_eval_mode: bool = False
    plantdoc_protocol: str = "reference"
    svm_iter: int = 100
