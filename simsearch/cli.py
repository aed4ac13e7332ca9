"""Options of the research script, resolved once into explicit settings, and the files and facts a run records.

Kept free of heavy imports (torch, timm, sentence-transformers load only when a function needs them), so that
``python p1_similarity_search_rsch.py --help`` answers at once. The script's upper-case constants are the defaults.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from simsearch import config
from simsearch.errors import UserError

__all__ = [
    "check_output_folder",
    "class_store_main",
    "class_store_parser",
    "grid_main",
    "grid_parser",
    "install_error_boundary",
    "is_user_error",
    "parse_script_args",
    "report_user_error",
    "reporting_user_errors",
    "resolve_dataset",
    "run_class_store",
    "distributed_main",
    "distributed_parser",
    "run_distributed",
    "run_environment",
    "run_grid",
    "run_research_script",
    "script_argv",
]

# analysis.ANALYSIS_PARTS, named here to keep --help light
ANALYSIS_PARTS = ("confusion", "retrieval", "prototypes", "tsne", "coverage", "openset", "reliability")
# prototypes.CLASSIFIERS, named here to keep --help light: the family's members, then auto, which picks one of them
MEMBER_NAMES = ("mean", "decorrelated", "balanced", "lda")
CLASSIFIER_NAMES = (*MEMBER_NAMES, "auto")
ESTIMATOR_NAMES = (*CLASSIFIER_NAMES, "knn1", "knn5", "kmeans2", "kmeans3", "probe")  # baselines.ESTIMATOR_NAMES
DOWNLOADS = ("animal90", "caltech101", "digits")  # datasets.DOWNLOADS, named here to keep --help light
PRECISIONS = ("fp32", "bf16", "fp16")  # engine.PRECISIONS, named here to keep --help light
SELECT_FOR = ("accuracy", "balanced")  # prototypes.SELECT_FOR, named here to keep --help light
SEARCH_BACKENDS = ("torch", "faiss")  # classdb.BACKENDS, named here to keep --help light


def script_argv() -> list[str]:
    """The script's command-line arguments; none inside an IPython kernel (Spyder, Jupyter), whose argv is its own."""
    return [] if "ipykernel" in sys.modules else sys.argv[1:]


SCRIPT_DESCRIPTION = (
    "Part 1: classification with a pretrained model and no fine-tuning, by similarity search. Every option defaults "
    "to an upper-case constant at the top of the script."
)


def parse_script_args(argv: list[str], *, defaults: dict[str, Any]) -> argparse.Namespace:
    """Parse and check the research script's options; ``defaults`` come from the script's constants."""
    parser = script_parser(defaults=defaults)
    args = parser.parse_args(argv)
    return _checked_script_args(parser, args)


def script_parser(*, defaults: dict[str, Any]) -> argparse.ArgumentParser:
    """The research script's options, each defaulting to one of the script's constants (``defaults``)."""
    parser = argparse.ArgumentParser(
        description=SCRIPT_DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=defaults["dataset"],
                      help="class-folder dataset (one sub-folder of images or .txt files per class) or a CSV/TSV "
                           "file of labelled sentences")
    data.add_argument("--download", nargs="?", const="animal90", choices=DOWNLOADS, default=None,
                      help="fetch a dataset instead of --dataset: animal90 (the article's, kagglehub, Kaggle "
                           "credentials), caltech101 (torchvision, into --cache-dir or ~/.cache) or digits "
                           "(scikit-learn's bundled 1,797 handwritten digits as class folders: no network)")
    data.add_argument("--download-per-class", type=int, default=None, metavar="N",
                      help="with --download digits: write only the first N images of each class (a quick check)")
    data.add_argument("--modality", choices=("auto", "image", "text"), default=defaults["modality"],
                      help="auto: text for a CSV/TSV file or folders of .txt files, images otherwise")
    data.add_argument("--text-column", default=defaults["text_column"], help="CSV/TSV column of the sentences")
    data.add_argument("--label-column", default=defaults["label_column"],
                      help="CSV/TSV label column (several, comma-separated, are joined with ':')")
    data.add_argument("--strict", action="store_true", help="stop on unreadable samples instead of skipping them")
    data.add_argument("--embeddings", default=None, metavar="DIR",
                      help="an embedding set of `python -m simsearch distributed` instead of --dataset: the protocol, "
                           "statistics and analyses run on it without the encoder")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=defaults["model"],
                       help=f"timm model for images (None: {defaults['image_model']}); sentence-transformers name or "
                            f"folder for text (None: {defaults['text_model']})")
    model.add_argument("--weights", default=defaults["weights"], help="local weights file for a timm model")
    model.add_argument("--device", default=defaults["device"],
                       help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps")
    model.add_argument("--cpu", action="store_true", help="same as --device cpu")
    model.add_argument("--precision", choices=PRECISIONS, default=defaults["precision"],
                       help="encoder arithmetic: fp32, bf16 (autocast; CPUs with AVX512-BF16/AMX, most CUDA GPUs) or "
                            "fp16 (autocast, CUDA only); cached embeddings are kept per precision")
    model.add_argument("--compile", action=argparse.BooleanOptionalAction, default=defaults["compile"],
                       help="torch.compile the image model (the first batch compiles; falls back to eager with a "
                            "warning where compilation fails)")
    model.add_argument("--tune-allocator", action=argparse.BooleanOptionalAction, default=defaults["tune_allocator"],
                       help="keep the encoder's activation buffers in glibc's heap between batches (2x faster "
                            "forward on a 2-core CPU; --no-tune-allocator keeps the system default)")
    model.add_argument("--batch-size", type=_count_or_auto(1), default=defaults["batch_size"],
                       help="samples per encoding batch (auto: 256 on CUDA, 32 on a CPU)")
    model.add_argument("--decode", choices=("pil", "tensor"), default=defaults["decode"],
                       help="pil: decode and resize images with PIL in the loader; tensor: read JPEG bytes in the "
                            "loader, decode (nvJPEG on CUDA), resize and normalise on the device (cached apart)")
    model.add_argument("--workers", type=_count_or_auto(0), default=defaults["workers"],
                       help="DataLoader worker processes (auto: a core each but one, at most 16, on CUDA; 0 on a CPU)")
    experiment = parser.add_argument_group("experiment")
    experiment.add_argument("--classifier", choices=CLASSIFIER_NAMES, default=defaults["classifier"],
                            help="mean: the article's class mean (cosine); decorrelated: centred ridge prototypes, "
                                 "for a representative dataset; balanced: decorrelated with every class weighing the "
                                 "same, for imbalanced classes and classes with few samples; lda: shrinkage linear "
                                 "discriminant, nothing tuned on the images (see --select-for)")
    experiment.add_argument("--select-for", choices=SELECT_FOR, default=defaults["select_for"],
                            help="the metric the lda classifier's class prior serves: accuracy (each class weighed by "
                                 "its share of the training samples) or balanced (every class alike) (default: "
                                 "%(default)s, lda's own choice: accuracy)")
    experiment.add_argument("--runs", type=int, default=defaults["runs"], help="number of random partitions")
    experiment.add_argument("--valid-share", type=float, default=defaults["valid_share"],
                            help="validation share of each class")
    experiment.add_argument("--top-k", type=int, default=defaults["top_k"],
                            help="k of the top-k accuracy and of the labels shown per query")
    experiment.add_argument("--confidence", type=float, default=defaults["confidence"],
                            help="two-sided confidence of the Student-t intervals")
    experiment.add_argument("--seed", type=int, default=defaults["seed"],
                            help="seed of the partitions and of every random draw")
    experiment.add_argument("--reproducible", action=argparse.BooleanOptionalAction, default=defaults["reproducible"],
                            help="seed every generator with --seed and pick reproducible kernels; without it the "
                                 "seed is drawn at random (and recorded in results.json)")
    experiment.add_argument("--protocol", choices=("cached", "original"), default=defaults["protocol"],
                            help="cached: encode every sample once; original: re-encode each partition like the "
                                 "article")
    experiment.add_argument("--augment-encode", action="store_true", default=defaults["augment_encode"],
                            help="augment the encoded training images (images only; switches to --protocol original)")
    experiment.add_argument("--augment-eval", action="store_true", default=defaults["augment_eval"],
                            help="augment the evaluated images (images only; switches to --protocol original)")
    experiment.add_argument("--short-run", type=int, default=defaults["short_run"], metavar="BATCHES",
                            help="quick check: stop every encoding pass after this many batches (never cached)")
    experiment.add_argument("--caf-from", choices=("pooled", "last"), default=defaults["caf_from"],
                            help="class accuracies of the CAF and the least accurate classes: pooled over all "
                                 "partitions, or from the last partition only (the original's choice)")
    experiment.add_argument("--caf-rule", choices=("ceil", "original"), default=defaults["caf_rule"],
                            help="CAF sampling rule (cumacc.cumulative_accuracy): ceil, or the original's numbers")
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--out", default=defaults["out"], help="directory for plots, CSV and JSON results")
    outputs.add_argument("--cache-dir", default=defaults["cache_dir"],
                         help="keep per-sample embeddings here between runs (None: no cache)")
    outputs.add_argument("--resume", action="store_true", help="continue the partitions saved in --out")
    outputs.add_argument("--save-embeddings", action="store_true", default=defaults["save_embeddings"],
                         help="also save the last partition's class vectors (store.save_embeddings ZIP)")
    outputs.add_argument("--analysis", nargs="?", const="all", default=None, metavar="PARTS",
                         help="cached protocol only; comma-separated parts, all when none are given: confusion "
                              "(confusions, per-class intervals, CAF band), retrieval (P@K, mAP@K), prototypes "
                              "(every classifier on the same partitions), tsne, coverage (a check of the intervals), "
                              "openset (20 %% of the classes hidden: how well unknown samples are told apart)")
    outputs.add_argument("--compare", default=None, metavar="NAMES",
                         help="comma-separated classifiers that --analysis prototypes compares on the same partitions "
                              f"(names: {', '.join(ESTIMATOR_NAMES)}) (default: %(default)s, all of them)")
    outputs.add_argument("--profile", action="store_true", default=defaults["profile"],
                         help="print the wall time of each phase of the run, and write a cProfile of the "
                              "partitions loop to --out/profile.log and --out/profile.prof")
    return parser


def _checked_script_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The parsed options, refused (as argparse refuses, exit status 2) where they contradict each other."""
    if args.runs < 1 or args.top_k < 1:
        parser.error("--runs and --top-k must be at least 1.")
    if args.select_for is not None and args.classifier != "lda":
        parser.error(f"--select-for chooses the lda classifier's prior; --classifier {args.classifier} has none.")
    if args.short_run is not None and args.short_run < 1:
        parser.error(f"--short-run must be at least 1 batch, got {args.short_run}.")
    _check_shared_options(parser, args)
    if args.analysis is not None:
        parts = ANALYSIS_PARTS if args.analysis == "all" else tuple(filter(None, args.analysis.split(",")))
        unknown = sorted(set(parts) - set(ANALYSIS_PARTS))
        if unknown or not parts:
            parser.error(f"--analysis: unknown part(s) {', '.join(unknown) or '(none)'}; choose among "
                         f"{', '.join(ANALYSIS_PARTS)} (comma-separated), or give no value for all.")
        args.analysis = [part for part in ANALYSIS_PARTS if part in parts]
    if args.compare is not None:
        names = tuple(filter(None, args.compare.split(",")))
        unknown = sorted(set(names) - set(ESTIMATOR_NAMES))
        if unknown or not names:
            parser.error(f"--compare: unknown classifier(s) {', '.join(unknown) or '(none)'}; choose among "
                         f"{', '.join(ESTIMATOR_NAMES)} (comma-separated).")
        args.compare = list(dict.fromkeys(names))
    if args.weights is not None and not pathlib.Path(args.weights).expanduser().is_file():
        kind = "a folder, not a file" if pathlib.Path(args.weights).expanduser().is_dir() else "no such file"
        parser.error(f"--weights {args.weights}: {kind}. Pass the path of a local weights file (.pth, .bin, "
                     ".safetensors).")
    if args.embeddings is not None and (args.protocol == "original" or args.augment_encode or args.augment_eval):
        parser.error("--embeddings holds one embedding per sample: it runs the cached protocol, without "
                     "augmentation; drop --protocol original, --augment-encode and --augment-eval.")
    if args.decode == "tensor" and (args.embeddings is not None or args.protocol == "original" or args.augment_encode
                                    or args.augment_eval):
        parser.error("--decode tensor decodes images for the cached protocol's one encode pass; it does not apply "
                     "with --embeddings, --protocol original or augmentation: drop --decode tensor.")
    if not 0.0 < args.valid_share < 1.0:
        parser.error(f"--valid-share must lie strictly between 0 and 1 (a share of each class validates, the rest "
                     f"trains), got {args.valid_share}.")
    if args.cpu:
        args.device = "cpu"
    if not args.reproducible:
        import random

        args.seed = random.SystemRandom().randrange(2**32)
    if (args.augment_encode or args.augment_eval) and args.protocol == "cached":
        print("Augmentation draws new images every pass, so it bypasses the embedding cache: --protocol original.")
        args.protocol = "original"
    return args


def _check_shared_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks the script and the grid share: interval confidence, seed range, and the output and cache folders
    (before any work, so a long run does not fail at its end)."""
    if not 0.0 < args.confidence < 1.0:
        parser.error(f"--confidence must lie strictly between 0 and 1, got {args.confidence}.")
    if not 0 <= args.seed < 2**32:
        parser.error(f"--seed must lie in 0..{2**32 - 1} (NumPy's seed range), got {args.seed}.")
    for option, folder in (("--out", args.out), ("--cache-dir", args.cache_dir)):
        if folder is not None:
            problem = check_output_folder(pathlib.Path(folder).expanduser())
            if problem:
                parser.error(f"{option} {folder}: {problem}")


def check_output_folder(folder: pathlib.Path) -> str | None:
    """Why ``folder`` cannot receive output files (it is a file, or it or its nearest existing parent is not
    writable), or None when it can; checked before any work so a long run does not fail at its end."""
    if folder.exists() and not folder.is_dir():
        return "is a file, not a folder. Pass a folder path."
    existing = next(path for path in (folder, *folder.absolute().parents) if path.exists())
    if not existing.is_dir():
        return f"{existing} is a file, so no folder can be made under it. Pass a folder path."
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable. Pass a folder you can write to."
    return None


def resolve_dataset(
    *, dataset: str, download: str | None, kaggle_dataset: str, download_dir: str | None = None,
    download_per_class: int | None = None,
) -> pathlib.Path:
    """The dataset (class-folder root or sentence file): the given path, or the folder a download leaves
    (:func:`datasets.download_dataset`)."""
    if download:
        from simsearch import datasets

        root = pathlib.Path(download_dir or pathlib.Path.home() / ".cache" / "similarity-search")
        return datasets.download_dataset(download, root=root, kaggle_dataset=kaggle_dataset,
                                         per_class=download_per_class)
    path = pathlib.Path(dataset).expanduser()
    if not path.exists():
        raise SystemExit(
            f"No dataset at {path.resolve()}. Pass --dataset DIR (one sub-folder of images or .txt files per class) "
            f"or a CSV/TSV file of sentences, or --download digits (bundled with scikit-learn, no network), "
            f"caltech101 or animal90 ({kaggle_dataset}, kagglehub)."
        )
    return path


def run_environment(*, repository: pathlib.Path) -> dict[str, Any]:
    """Versions and the package's git commit, so a result can be traced to the code and libraries behind it."""
    versions = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "timm", "sentence-transformers", "scikit-learn", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(repository), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"versions": versions, "git_commit": commit, "platform": platform.platform()}


class PhaseClock:
    """Wall seconds between named points of a run (options, imports, device start, listing, model, encoding and
    partitions, results...): where the seconds outside ``total_seconds`` go. Torch-free, so it starts first."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def mark(self, name: str) -> None:
        """Close the phase ``name`` now; a name marked again adds up."""
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._last
        self._last = now

    def describe(self) -> str:
        total = sum(self.phases.values())
        rows = [f"  {name:32s} {seconds:8.2f} s" for name, seconds in self.phases.items()]
        return "\n".join(["Phases of this run (wall time):", *rows, f"  {'total':32s} {total:8.2f} s"])


def _count_or_auto(minimum: int) -> Callable[[str], int | str]:
    """An argument type: ``auto`` (resolved for the device by ``config.LoaderSettings``) or a whole number of at
    least ``minimum``."""

    def parse(text: str) -> int | str:
        if text == config.AUTO:
            return text
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be auto or a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be auto or at least {minimum}, got {value}")
        return value

    return parse


def _open_unit_interval(text: str) -> float:
    """A share strictly between 0 and 1, checked while parsing, before any encoding."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number strictly between 0 and 1, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def class_store_parser(prog: str = "python -m simsearch store") -> argparse.ArgumentParser:
    """The class-store commands' options (``python -m simsearch store``, ``similarity-classdb``), importable without
    torch."""
    model_options = argparse.ArgumentParser(add_help=False)
    model_options.add_argument(
        "--model",
        help="timm model name for images, sentence-transformers name or folder for texts (default for an existing "
        "store: the one it was built with)",
    )
    model_options.add_argument(
        "--weights", help="local weights file for a timm --model (otherwise timm downloads them)"
    )
    model_options.add_argument("--batch-size", type=int, default=32, help="samples per encoding batch (default 32)")
    model_options.add_argument("--cpu", action="store_true", help="encode on the CPU even when CUDA is available")
    store_option = argparse.ArgumentParser(add_help=False)
    store_option.add_argument("--store", required=True, help="class vector store file (.zip or .npz)")

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Build, edit and query a class vector database of images or texts (one class-vector classifier).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", parents=[model_options], help="encode a dataset into a new store")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--dataset",
        help="folder with one sub-folder of images (or .txt files) per class, or a CSV/TSV file of labelled texts",
    )
    source.add_argument("--embeddings", metavar="DIR",
                        help="an fp32 embedding set of `python -m simsearch distributed` instead of --dataset (no "
                             "encoding)")
    build.add_argument("--modality", choices=("auto", "image", "text"), default="auto",
                       help="auto: text for a CSV/TSV file or folders of .txt files (default)")
    build.add_argument("--text-column", default="text", help="CSV/TSV column of the texts (default text)")
    build.add_argument("--label-column", default="label",
                       help="CSV/TSV label column; several, comma-separated, are joined with ':' (default label)")
    build.add_argument("--out", "--store", dest="store", required=True, help="new store file (.zip or .npz)")
    build.add_argument("--cache-dir", default=None,
                       help="the research script's embedding cache: a dataset it encoded before is read back, not "
                            "encoded again (default: no cache)")
    build.add_argument("--force", action="store_true", help="replace an existing store file")
    build.add_argument(
        "--calibrate-share", type=float, default=0.2,
        help="share of each class held out to set the threshold for unknown queries, then added to the store "
             "(0: no threshold; default 0.2)",
    )
    build.add_argument("--true-positive-rate", type=_open_unit_interval, default=0.95,
                       help="share of known-class samples the threshold keeps (default 0.95)")
    build.add_argument(
        "--classifier", choices=CLASSIFIER_NAMES, default=None,
        help="balanced (default for a .npz store): decorrelated prototypes with every class weighing the same, which "
             "finds a class added with one sample; mean: the article's class means (default for a .zip store, the "
             "only kind a .zip holds); decorrelated: ridge prototypes carrying the class frequencies (.npz)",
    )

    for name, what in (("add-class", "add a new class"), ("update-class", "add more samples to an existing class")):
        command = commands.add_parser(
            name, parents=[store_option, model_options], help=f"{what} from images or texts"
        )
        command.add_argument(
            "--images", "--texts", dest="samples", required=True,
            help="an image file or folder of images; for a text store a folder of .txt files or a file of lines",
        )
        command.add_argument("--label", required=True, help="class label")

    remove = commands.add_parser("remove-class", parents=[store_option], help="remove one class")
    remove.add_argument("label", help="class label")

    rename = commands.add_parser("rename-class", parents=[store_option], help="rename one class")
    rename.add_argument("label", help="current class label")
    rename.add_argument("new_label", help="new class label")

    classify = commands.add_parser(
        "classify", parents=[store_option, model_options], help="label images or texts by the store"
    )
    classify.add_argument(
        "samples", metavar="IMAGES_OR_TEXTS",
        help="an image file or folder of images; for a text store a folder of .txt files or a file of lines",
    )
    classify.add_argument("--top-k", type=int, default=4, help="classes to report per image (default 4)")
    classify.add_argument(
        "--backend", choices=SEARCH_BACKENDS, default="torch", help="search backend (default torch)"
    )
    classify.add_argument("--csv", help="also write the predictions to this CSV file")
    classify.add_argument(
        "--reject", action=argparse.BooleanOptionalAction, default=None,
        help="print 'unknown' for samples below the store's threshold (default: when the store has one)",
    )

    calibrate = commands.add_parser(
        "calibrate", parents=[store_option, model_options],
        help="set the threshold for unknown queries from samples of the store's classes that it does not hold",
    )
    calibrate.add_argument(
        "--dataset", required=True,
        help="class folders (or a CSV/TSV of labelled texts) of the store's classes, not added to it",
    )
    calibrate.add_argument("--text-column", default="text", help="CSV/TSV column of the texts (default text)")
    calibrate.add_argument("--label-column", default="label", help="CSV/TSV label column (default label)")
    calibrate.add_argument("--true-positive-rate", type=_open_unit_interval, default=0.95,
                           help="share of the samples the threshold keeps (default 0.95)")

    commands.add_parser("info", parents=[store_option], help="print the model and the classes of a store")

    imported = commands.add_parser(
        "import", parents=[store_option, model_options], help="turn a store.save_embeddings file into a store"
    )
    imported.add_argument("--embeddings", required=True, help="ZIP written by store.save_embeddings")
    imported.add_argument("--force", action="store_true", help="replace an existing store file")
    return parser


def is_user_error(error: BaseException) -> bool:
    """True for errors a user can fix: the package's ``utils.UserError`` family and operating-system errors (a
    missing, unreadable or read-only path, a full disk). Anything else is a bug and keeps its traceback."""
    return isinstance(error, (OSError, UserError))


def report_user_error(error: BaseException) -> None:
    """One line on stderr: the error's own message, which names the file or option and what to do."""
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"error: {message}", file=sys.stderr)


def reporting_user_errors(command: Callable[[], int]) -> int:
    """Run a command-line command; a user error is printed as one line and gives exit status 1."""
    try:
        status = command()
        sys.stdout.flush()  # here, not at exit: a reader that left early is met by the handler below
        return status
    except BrokenPipeError:
        # the reader of the output left early (``| head``): files are written before printing, so stop quietly,
        # as a command killed by SIGPIPE does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    except Exception as error:
        if not is_user_error(error):
            raise
        report_user_error(error)
        return 1


def install_error_boundary() -> None:
    """Make a user error that ends the script print one line and exit with status 1; bugs keep their traceback.

    Left out inside an IPython kernel (Spyder, Jupyter), which shows errors in its own way and keeps running.
    """
    if "ipykernel" in sys.modules:
        return
    previous_hook = sys.excepthook

    def boundary(kind: type[BaseException], error: BaseException, traceback: Any) -> None:
        if is_user_error(error):
            report_user_error(error)
        else:
            previous_hook(kind, error, traceback)

    sys.excepthook = boundary


def class_store_main(argv: list[str] | None = None, *, prog: str = "python -m simsearch store") -> int:
    """Parse a class-store command, then load the heavy modules and run it; user errors become one line."""
    parser = class_store_parser(prog)
    args = parser.parse_args(argv)
    if getattr(args, "top_k", 1) < 1 or getattr(args, "batch_size", 1) < 1:
        parser.error("--top-k and --batch-size must be at least 1.")
    from simsearch.classdb import commands

    return reporting_user_errors(lambda: commands.run_command(args))


def grid_parser(prog: str = "python -m simsearch grid") -> argparse.ArgumentParser:
    """Options of the model x dataset x classifier grid (``python -m simsearch grid``, ``similarity-grid``); the
    defaults are ``config.GridSettings``'s."""
    grid_defaults = config.GridSettings()
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Several models, datasets and classifiers on identical partitions per dataset: one CSV and one "
                    "Markdown table with accuracy, top-k, paired differences to a baseline, encoding rate and "
                    "embedding size. Embeddings and finished cells are reused on a rerun.",
    )
    parser.add_argument("--datasets", nargs="+", default=[],
                        help="class-folder datasets (images or .txt files) or CSV/TSV files of labelled sentences")
    parser.add_argument("--embeddings", nargs="+", default=[], metavar="DIR",
                        help="embedding sets of `python -m simsearch distributed` (a model on a dataset each), run "
                             "without the encoder")
    parser.add_argument("--text-column", default="text", help="CSV/TSV column of the texts (sentence datasets)")
    parser.add_argument("--label-column", default="label", help="CSV/TSV column of the labels (sentence datasets)")
    parser.add_argument("--models", nargs="*", default=[], metavar="NAME[=WEIGHTS]",
                        help="timm image models, each with an optional local weights file")
    parser.add_argument("--text-models", nargs="*", default=[], metavar="NAME_OR_FOLDER",
                        help="sentence-transformers models for the text datasets")
    parser.add_argument("--classifiers", nargs="+", choices=ESTIMATOR_NAMES, default=list(MEMBER_NAMES),
                        help="class-vector classifiers, and the baselines beside them (k nearest images, k-means "
                             "centres per class, a linear probe)")
    parser.add_argument("--baseline", default=None, metavar="MODEL:CLASSIFIER",
                        help="the cell each dataset's differences are paired with (default: its first model with "
                             "the first classifier)")
    parser.add_argument("--runs", type=int, default=grid_defaults.runs, help="random partitions per dataset")
    parser.add_argument("--valid-share", type=float, default=grid_defaults.valid_share,
                        help="validation share of each class")
    parser.add_argument("--top-k", type=int, default=grid_defaults.top_k, help="k of the top-k accuracy")
    parser.add_argument("--seed", type=int, default=grid_defaults.seed,
                        help="seed of the partitions, the same for every cell")
    parser.add_argument("--confidence", type=float, default=grid_defaults.confidence,
                        help="confidence of the Student-t intervals")
    parser.add_argument("--batch-size", type=_count_or_auto(1), default=config.AUTO,
                        help="samples per encoding batch (auto: 256 on CUDA, 32 on a CPU)")
    parser.add_argument("--workers", type=_count_or_auto(0), default=config.AUTO,
                        help="DataLoader worker processes (auto: a core each but one on CUDA, 0 on a CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--precision", choices=PRECISIONS, default=grid_defaults.precision, help="encoder arithmetic")
    parser.add_argument("--cache-dir", default=".cache", help="embedding cache, shared with the research script")
    parser.add_argument("--out", default="grid-results", help="folder for grid.csv, grid.md and the finished cells")
    return parser


def grid_main(argv: list[str] | None = None, *, prog: str = "python -m simsearch grid") -> int:
    """Parse and check the grid's options, then run it; user errors become one line."""
    parser = grid_parser(prog)
    args = parser.parse_args(argv)
    if not args.datasets and not args.embeddings:
        parser.error("give --datasets (with --models or --text-models) or --embeddings.")
    if args.datasets and not args.models and not args.text_models:
        parser.error("give at least one model: --models for images, --text-models for sentences.")
    if args.runs < 1 or args.top_k < 1 or not 0.0 < args.valid_share < 1.0:
        parser.error("--runs and --top-k must be at least 1, --valid-share strictly between 0 and 1.")
    _check_shared_options(parser, args)
    baseline = tuple(args.baseline.rsplit(":", 1)) if args.baseline else None
    if baseline is not None and (len(baseline) != 2 or baseline[1] not in ESTIMATOR_NAMES):
        parser.error(f"--baseline {args.baseline}: give MODEL:CLASSIFIER, e.g. tf_efficientnet_lite0:mean.")
    from simsearch import grid, utils

    def run() -> int:
        device = utils.resolve_device(args.device)
        loader = config.LoaderSettings.resolve(device_type=device.type, workers=args.workers,
                                               batch_size=args.batch_size)
        table = grid.run_grid(
            datasets=args.datasets,
            models=[grid.parse_model_spec(spec, modality="image") for spec in args.models]
            + [grid.parse_model_spec(spec, modality="text") for spec in args.text_models],
            classifiers=args.classifiers, out=args.out, cache_dir=args.cache_dir, baseline=baseline,
            embedding_sets=args.embeddings, text_column=args.text_column, label_column=args.label_column,
            settings=config.GridSettings(
                runs=args.runs, valid_share=args.valid_share, top_k=args.top_k, seed=args.seed,
                confidence=args.confidence, batch_size=loader.batch_size, workers=loader.workers,
                device=str(device), precision=args.precision,
            ),
        )
        out = pathlib.Path(args.out)
        print((out / "grid.md").read_text(encoding="utf-8"))
        print(f"Written: {out / 'grid.csv'} ({len(table)} cells), {out / 'grid.md'}")
        return 0

    return reporting_user_errors(run)


def distributed_parser(prog: str = "python -m simsearch distributed") -> argparse.ArgumentParser:
    """Options of the distributed encode (``python -m simsearch distributed``, ``similarity-distributed``)."""
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Encode a class-folder image dataset or a CSV/TSV of labelled texts on a Ray cluster (or a local "
                    "Ray) into a Parquet embedding set with a manifest; --embeddings DIR of the research script, the "
                    "grid and the class store read it without the encoder.",
    )
    parser.add_argument("dataset", help="class folders of images (or .txt files), or a CSV/TSV of labelled texts")
    parser.add_argument("--out", required=True, help="folder of the embedding set (shards/ and manifest.json)")
    parser.add_argument("--modality", choices=("auto", "image", "text"), default="auto")
    parser.add_argument("--text-column", default="text", help="CSV/TSV column of the texts")
    parser.add_argument("--label-column", default="label", help="CSV/TSV column of the labels")
    parser.add_argument("--strict", action="store_true", help="stop at the first unusable file instead of skipping")
    parser.add_argument("--model", default=None,
                        help="timm model (images; default tf_efficientnet_lite0) or sentence-transformers name or "
                             "folder (texts; default sentence-transformers/all-MiniLM-L6-v2)")
    parser.add_argument("--weights", default=None, help="local weights file for a timm model (every node reads it)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="encoder arithmetic")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile the image model in every actor")
    parser.add_argument("--tune-allocator", action=argparse.BooleanOptionalAction, default=True,
                        help="keep activation buffers in glibc's heap between batches")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per actor call")
    parser.add_argument("--actors", type=int, default=1, help="encoder actors (one model copy each)")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (1 on a GPU cluster)")
    parser.add_argument("--cpus-per-actor", type=float, default=None,
                        help="CPUs per actor, its torch and image-decoding threads (default: the CPUs shared out "
                             "among the actors; 1 with GPUs: give a GPU actor its share of the node's cores)")
    parser.add_argument("--rows-per-shard", type=int, default=100_000, help="at most this many samples per shard")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (e.g. auto, or ray://head:10001; default: RAY_ADDRESS, else a "
                             "local Ray)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    return parser


def distributed_main(argv: list[str] | None = None, *, prog: str = "python -m simsearch distributed") -> int:
    """Parse the distributed encode's options, then start or join Ray and encode; user errors become one line."""
    parser = distributed_parser(prog)
    args = parser.parse_args(argv)
    if min(args.batch_size, args.actors, args.rows_per_shard) < 1 or args.gpus_per_actor < 0:
        parser.error("--batch-size, --actors and --rows-per-shard must be at least 1, --gpus-per-actor 0 or more.")
    if args.num_cpus is not None and args.num_cpus < 1:
        parser.error(f"--num-cpus must be at least 1, got {args.num_cpus}.")
    if args.cpus_per_actor is not None and args.cpus_per_actor < 1:
        parser.error(f"--cpus-per-actor must be at least 1, got {args.cpus_per_actor:g}.")

    def run() -> int:
        from simsearch import datasets, distributed

        distributed.init_ray(address=args.address, num_cpus=args.num_cpus)  # first: an unreachable cluster is refused
        maker = datasets.make_dataset_maker(
            dataset_path=args.dataset, modality=args.modality, text_column=args.text_column,
            label_column=args.label_column, strict=args.strict,
        )
        text = maker.modality == "text"
        if text and args.weights:
            raise SystemExit("--weights applies to timm image models; a local sentence-transformers model is a "
                             "folder: pass it as --model.")
        default_model = "sentence-transformers/all-MiniLM-L6-v2" if text else "tf_efficientnet_lite0"
        spec = distributed.EncoderSpec(
            modality=maker.modality, model_name=args.model or default_model, weights=args.weights,
            precision=args.precision, compile=args.compile, tune_allocator=args.tune_allocator,
        )
        manifest = distributed.encode_dataset(
            maker=maker, spec=spec, out=args.out, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
            batch_size=args.batch_size, rows_per_shard=args.rows_per_shard, cpus_per_actor=args.cpus_per_actor,
        )
        rate = manifest["num_samples"] / max(manifest["encode_seconds"], 1e-9)
        print(f"Wrote {args.out}: {distributed.describe(manifest)}; {rate:.1f} samples/s with {args.actors} actor(s)")
        return 0

    return reporting_user_errors(run)


def research_script_main(argv: list[str] | None = None, *, prog: str = "python -m simsearch run") -> int:
    """Run the research script end to end with these options, as ``python p1_similarity_search_rsch.py`` does.

    The script is the checkout's own file where there is one (a clone, an editable install), else the copy the
    package was built with; its imports of the original's names resolve to this package's modules either way.
    """
    from simsearch import originals

    originals.install_names()
    script = originals.research_script()
    code = compile(script.read_text(encoding="utf-8"), str(script), "exec")
    saved_argv = sys.argv
    # run as runpy.run_path does, but with argv[0] the command as it was typed, which --help names
    sys.argv = [prog, *(sys.argv[1:] if argv is None else argv)]
    try:
        exec(code, {"__name__": "__main__", "__file__": str(script), "__builtins__": __builtins__})
    finally:
        sys.argv = saved_argv
    return 0


COMMAND_FAMILIES: dict[str, Callable[[list[str]], int]] = {
    "run": research_script_main, "store": class_store_main, "grid": grid_main, "distributed": distributed_main,
}


def main(argv: list[str] | None = None) -> int:
    """``python -m simsearch run|store|grid|distributed ...``: the research script, the class store, the grid and
    the distributed encode."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMAND_FAMILIES:
        print(f"usage: python -m simsearch {{{','.join(COMMAND_FAMILIES)}}} ... (--help after one for its options)",
              file=sys.stderr)
        return 2
    return COMMAND_FAMILIES[argv[0]](argv[1:])


def run_research_script() -> None:
    """Console entry point ``similarity-search``: the research script (``python -m simsearch run``)."""
    sys.exit(research_script_main(prog="similarity-search"))


def run_class_store() -> None:
    """Console entry point ``similarity-classdb``: the class-store commands (``python -m simsearch store``)."""
    sys.exit(class_store_main(prog="similarity-classdb"))


def run_grid() -> None:
    """Console entry point ``similarity-grid``: the model x dataset x classifier grid (``python -m simsearch grid``)."""
    sys.exit(grid_main(prog="similarity-grid"))


def run_distributed() -> None:
    """Console entry point ``similarity-distributed``: the distributed encode (``python -m simsearch distributed``)."""
    sys.exit(distributed_main(prog="similarity-distributed"))
