"""Part 1: classification with a pretrained model and no fine-tuning, by similarity search.

Every training image (or sentence) becomes an embedding, each class is represented by a class vector (the article:
the mean of its embeddings), and a query is labelled with the most similar class vector. Accuracy is averaged over
many random train/validation partitions and reported with a Student-t confidence interval.

Run the ``#%%`` cells one by one in Spyder (each cell is a few library calls at top level; edit the upper-case
constants below to change the defaults), or the whole file::

    python p1_similarity_search_rsch.py --dataset DIR --model tf_efficientnet_lite0 --weights FILE --runs 20

``python p1_similarity_search_rsch.py --help`` lists every option with its default (these constants).
"""

# %% Settings: the defaults of every command-line option.
DATASET_PATH = "../data/banerjee-animal-90/animals"  # class folders of images or .txt files, or a CSV/TSV file
KAGGLE_DATASET = "iamsouravbanerjee/animal-image-dataset-90-different-animals"
MODALITY = "auto"  # "image", "text" or "auto" (text for CSV/TSV files and folders of .txt files)
TEXT_COLUMN = "text"
LABEL_COLUMN = "label"
MODEL_NAME = None  # None: IMAGE_MODEL_NAME or TEXT_MODEL_NAME, by the dataset's modality
IMAGE_MODEL_NAME = "tiny_vit_11m_224.dist_in22k_ft_in1k"
TEXT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
WEIGHTS = None  # a local weights file for the timm model: runs offline, no hub download
DEVICE = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"
PRECISION = "fp32"  # "fp32", "bf16" (fast only on CPUs with AVX512-BF16/AMX and on GPUs) or "fp16" (CUDA)
COMPILE = False  # torch.compile the image model
TUNE_ALLOCATOR = True  # keep activation buffers in glibc's heap between batches (utils.tune_allocator)
CLASSIFIER = "mean"  # "mean" (the article), "decorrelated", "balanced" or "lda"
SELECT_FOR = None  # "lda" only: "accuracy" (None: the default) or "balanced", the metric its class prior serves
RUNS = 20
VALID_SHARE = 0.2
TOPK = 4
CONFIDENCE = 0.95
RANDOM_SEED = 17
REPRODUCIBLE = True  # False: a random seed (recorded in results.json) and no determinism settings
CAF_FROM = "pooled"  # "pooled" over all partitions, or "last" partition only (the original's choice)
CAF_RULE = "ceil"  # "ceil", or "original" for the original project's CAF numbers
PROTOCOL = "cached"
BATCH_SIZE = "auto"  # 256 on CUDA, 32 on a CPU (config.LoaderSettings)
NUM_WORKERS = "auto"  # a worker per core but one on CUDA, none on a CPU
DECODE = "pil"  # "pil", or "tensor": JPEGs decoded, resized and normalised on the device (nvJPEG on CUDA)
CACHE_DIR = None  # a folder: keep per-sample embeddings between runs
OUT_DIR = "results"
AUGMENT_ENCODE_DATA = False
AUGMENT_EVAL_DATA = False
SHORT_RUN_BATCHES = None
SAVE_EMBEDDINGS = False
PROFILE = False
CLASS_ACCURACY_THRESHOLD = 0.8
NUM_INTERVALS = 20

from simsearch import cli  # noqa: E402  (light: --help answers before torch is imported)

clock = cli.PhaseClock()  # --profile prints where the run's wall time went, imports and start-up included
cli.install_error_boundary()  # a user error ends the script with one line, not a traceback
args = cli.parse_script_args(
    cli.script_argv(),
    defaults=dict(
        dataset=DATASET_PATH, modality=MODALITY, text_column=TEXT_COLUMN, label_column=LABEL_COLUMN,
        model=MODEL_NAME, image_model=IMAGE_MODEL_NAME, text_model=TEXT_MODEL_NAME, weights=WEIGHTS,
        device=DEVICE, precision=PRECISION, compile=COMPILE, tune_allocator=TUNE_ALLOCATOR,
        batch_size=BATCH_SIZE, workers=NUM_WORKERS, decode=DECODE,
        classifier=CLASSIFIER, select_for=SELECT_FOR, runs=RUNS,
        valid_share=VALID_SHARE, top_k=TOPK, confidence=CONFIDENCE, seed=RANDOM_SEED, reproducible=REPRODUCIBLE,
        caf_from=CAF_FROM, caf_rule=CAF_RULE, protocol=PROTOCOL,
        augment_encode=AUGMENT_ENCODE_DATA, augment_eval=AUGMENT_EVAL_DATA, short_run=SHORT_RUN_BATCHES,
        out=OUT_DIR, cache_dir=CACHE_DIR, save_embeddings=SAVE_EMBEDDINGS, profile=PROFILE,
    ),
)
print("Part 1: similarity search using a pretrained model.")
clock.mark("options")

# %% Imports, device and randomness.
import dataclasses  # noqa: E402
import pathlib  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import banerjee  # noqa: E402  (the original's names: the package's modules, see simsearch/originals.py)
import cumacc  # noqa: E402
import engine  # noqa: E402
import randomness  # noqa: E402
import store  # noqa: E402
import utils  # noqa: E402
import visual  # noqa: E402
from simsearch import config, protocol  # noqa: E402
from simsearch.classifiers import registry  # noqa: E402

clock.mark("imports")
started = time.perf_counter()
device = utils.resolve_device(args.device)
loader = config.LoaderSettings.resolve(device_type=device.type, workers=args.workers, batch_size=args.batch_size)
allocator = utils.tune_allocator(enabled=args.tune_allocator)
utils.check_cuda_support(inform=True)
if args.reproducible:
    randomness.set_determinism(seed=args.seed)
fit_device = registry.fit_device(device)  # the classifiers' fits and the analysis: on a CUDA device, else the CPU
settings = config.RunSettings(  # what every partition shares: both protocols, the stats and the analysis read it
    runs=args.runs, valid_share=args.valid_share, top_k=args.top_k, seed=args.seed, confidence=args.confidence,
    classifier=registry.make_estimator(
        args.classifier, device=fit_device, **({} if args.select_for is None else {"select_for": args.select_for})),
    short_run=args.short_run,
)
clock.mark("device start")

# %% The dataset (images or sentences) and the model name, checked before the samples are listed.
embedding_set = None
if args.embeddings:  # an embedding set of `python -m simsearch distributed`: the samples' embeddings, no encoder needed
    from simsearch import distributed

    embedding_set = distributed.read_embedding_set(args.embeddings)
    dsm = embedding_set.listing()
    model_name = embedding_set.manifest["model_name"]
else:
    dataset_path = cli.resolve_dataset(
        dataset=args.dataset, download=args.download, kaggle_dataset=KAGGLE_DATASET, download_dir=args.cache_dir,
        download_per_class=args.download_per_class,
    )
    modality = banerjee.detect_modality(dataset_path) if args.modality == "auto" else args.modality
    model_name = args.model or (TEXT_MODEL_NAME if modality == "text" else IMAGE_MODEL_NAME)
    if modality == "text" and (args.augment_encode or args.augment_eval or args.weights or args.decode != "pil"):
        raise SystemExit("--augment-encode, --augment-eval, --weights and --decode tensor apply to image models "
                         "only; a local sentence-transformers model is a folder: pass it as --model.")
    if modality == "image":
        engine.check_model_name(model_name)
    dsm = banerjee.make_dataset_maker(
        dataset_path=dataset_path, modality=modality, text_column=args.text_column, label_column=args.label_column,
        strict=args.strict,
    )
text = dsm.modality == "text"
labels = dsm.get_labels()
if settings.top_k > len(labels):
    raise SystemExit(f"--top-k {settings.top_k} exceeds the {len(labels)} classes of {dsm.dataset_path}.")
if settings.top_k == len(labels):
    print(f"Note: --top-k {settings.top_k} names every class of {dsm.dataset_path.name}, so the top-{settings.top_k} "
          "accuracy is 1 by construction.")
clock.mark("dataset listing and image check")

# %% The model, its preprocessing and the encoder (none for an embedding set).
encoder = None if embedding_set else engine.create_encoder(
    modality=dsm.modality, model_name=model_name, weights=args.weights, device=device,
    config=engine.EncoderConfig(
        topk=settings.top_k, short_run_batches=settings.short_run, precision=args.precision, compile=args.compile,
        tune_allocator=args.tune_allocator,
    ),
)
data_config, eval_transform = engine.eval_transform(encoder.model) if encoder and not text else (None, None)
augmenting_transform = banerjee.augment_data(data_config) if data_config else None
encode_transform = augmenting_transform if args.augment_encode else eval_transform
query_transform = augmenting_transform if args.augment_eval else eval_transform
model_description = encoder.describe() if encoder else embedding_set.describe()
print(f"Dataset: {dsm.dataset_path} ({len(labels)} classes, {dsm.get_num_images()} {dsm.sample_kind}s, "
      f"{len(dsm.skipped)} skipped); model: {model_description['model_name']}; device: {device}; "
      + (loader.describe() if encoder else "nothing to encode (an embedding set)"))
clock.mark("model")

# %% Encode and evaluate over random partitions.
out_dir = pathlib.Path(args.out)
run_log = out_dir / "runs.jsonl"
out_lock = store.acquire_writer_lock(run_log, timeout=0)  # held to the end: a second run into --out stops here
common = dict(
    encoder=encoder, maker=dsm, settings=settings, batch_size=loader.batch_size, workers=loader.workers,
    run_log=run_log, completed=protocol.load_run_records(run_log) if args.resume else [], inform=True,
)
try:
    with utils.Profile(active=args.profile) as profiler:
        if args.protocol == "cached":
            run_results = protocol.run_cached_protocol(
                transform=eval_transform, cache=store.EmbeddingCache(args.cache_dir) if args.cache_dir else None,
                decode=args.decode,
                embeddings=(embedding_set.embeddings, embedding_set.targets) if embedding_set else None, **common,
            )
        else:
            run_results = protocol.run_original_protocol(
                encode_transform=encode_transform, eval_transform=query_transform,
                augment_seed=settings.seed if args.augment_encode or args.augment_eval else None, **common,
            )
except KeyboardInterrupt as interrupt:
    raise SystemExit(f"Interrupted. Finished partitions are kept in {run_log}; rerun with --resume to go on."
                     ) from interrupt
clock.mark("encoding and partitions")
if args.profile:
    print(f"Profile written to {profiler.dump(filename=out_dir / 'profile', sort_by='cumulative')}")

# %% Final stats over the partitions.
final_stats = protocol.final_stats(
    runs=run_results, model=model_description, maker=dsm, confidence=settings.confidence,
    total_seconds=time.perf_counter() - started,
)
utils.print_stats(protocol.describe_final_stats(final_stats), title="Final stats")

# %% Per-class accuracy and the cumulative accuracy function (pooled over the partitions, or the last one).
caf_runs = run_results.runs if args.caf_from == "pooled" else run_results.runs[-1:]
class_accuracy = cumacc.class_accuracies(
    targets=[t for r in caf_runs for t in r.targets], predictions=[p for r in caf_runs for p in r.predictions],
    num_labels=len(labels),
)
cum_accuracies, class_shares = cumacc.cumulative_accuracy(
    accuracies=class_accuracy, num_intervals=NUM_INTERVALS, rule=args.caf_rule
)
visual.draw_cumulative_accuracy(
    shares=class_shares, cum_accs=cum_accuracies, figsize=(5, 5), filename=out_dir / "cumacc.png",
    title=f"CAF ({args.caf_rule} rule) of {model_name} on {dsm.dataset_path.name}, "
          + (f"pooled over {len(run_results)} partitions" if args.caf_from == "pooled" else "last partition"),
)

# %% The least accurate classes.
least_accurate_classes = cumacc.least_accurate_classes(
    accuracies=class_accuracy, labels=labels, threshold=CLASS_ACCURACY_THRESHOLD
)
print(f"Classes with mean accuracy <= {CLASS_ACCURACY_THRESHOLD}:")
print("\n".join(f"  {item['label']!r}: {item['accuracy']:.3f}" for item in least_accurate_classes) or "  (none)")

# %% Save results (and, optionally, the class vectors of the last partition).
written = [
    store.write_csv(out_dir / "runs.csv", pd.DataFrame(protocol.run_table(run_results))),
    store.write_csv(out_dir / "class_accuracy.csv", {"label": labels, "accuracy": class_accuracy}),
    store.write_json(out_dir / "results.json", {
        "settings": vars(args),
        "loader": dataclasses.asdict(loader),
        "environment": {**cli.run_environment(repository=pathlib.Path(__file__).resolve().parent),
                        "allocator": allocator["allocator"]},
        "final_stats": final_stats,
        "phases": clock.phases,
        "accuracies": [r.accuracy for r in run_results],
        "balanced_accuracies": [r.balanced_accuracy for r in run_results],
        "topk_accuracies": [r.topk_accuracy for r in run_results],
        "choices": [r.choice for r in run_results],
        "least_accurate_classes": least_accurate_classes,
        "skipped_files": [{"path": str(path), "reason": reason} for path, reason in dsm.skipped],
    }),
]
if args.save_embeddings and run_results.classifier is not None:
    written.append(store.save_embeddings(
        embeddings=run_results.classifier.class_means_.astype(np.float32),
        targets=np.array([labels[i] for i in run_results.classifier.classes_]),
        filename=out_dir / f"embeddings-{pathlib.Path(model_name).name}",
    ))
print("\n".join(f"Written: {path}" for path in [*written, out_dir / "cumacc.png", run_log]))
clock.mark("stats, CAF and results")

# %% Analysis (--analysis [PARTS]): confusion, retrieval P@K, every classifier, t-SNE, CI check.
if args.analysis and run_results.embeddings is None:
    print("--analysis needs the per-sample embeddings of the cached protocol; skipped.")
if args.analysis and run_results.embeddings is not None:
    from simsearch import analysis

    analysed = analysis.analyse_runs(
        runs=run_results, labels=labels, valid_share=settings.valid_share, confidence=settings.confidence,
        seed=settings.seed,
        num_intervals=NUM_INTERVALS, threshold=CLASS_ACCURACY_THRESHOLD, parts=args.analysis,
        sample_names=[str(sample) for sample in dsm.get_samples()], methods=args.compare, device=fit_device,
    )
    written = visual.draw_analysis(
        analysed, labels=labels, out_dir=out_dir, confidence=settings.confidence, sample_kind=dsm.sample_kind,
        title=f"{model_name} on {dsm.dataset_path.name}, {len(run_results)} partitions",
    )
    written += [store.write_csv(out_dir / f"{name}.csv", table) for name, table in analysed.tables().items()]
    if analysed.coverage is not None:
        written.append(store.write_json(out_dir / "ci_coverage.json", analysed.coverage))
    if analysed.openset_summary is not None:
        written.append(store.write_json(out_dir / "openset.json", analysed.openset_summary))
    print("\n".join(f"Written: {path}" for path in written))
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        for heading, table in (("Most confused pairs", analysed.confused_pairs),
                               ("Samples nearest a decision boundary (smallest margins)", analysed.hard_samples),
                               ("Retrieval over individual samples", analysed.retrieval),
                               ("Every classifier on the same partitions", analysed.prototypes),
                               ("Confidence interval coverage", analysed.coverage),
                               ("Samples of hidden classes (open set), per partition", analysed.openset),
                               ("Open set summary", analysed.openset_summary)):
            if table is not None:
                print(f"-- {heading} --", table, sep="\n")  # confused pairs: the top 10 already

# %% Manual checking: one random validation sample of the last partition.
valid_ds = dsm.datasets_from_indexes(indexes=torch.tensor(run_results[-1].valid_indexes), transform=eval_transform)
if encoder is None:
    print("Manual and visual checking encode new samples: skipped for an embedding set (no encoder).")
searchable = encoder is not None and run_results.classifier is not None and len(valid_ds) > 0
class_names = [labels[i] for i in run_results.classifier.classes_] if searchable else []
if searchable:
    image_idx = random.randrange(len(valid_ds))
    image, target_label_idx = valid_ds[image_idx]
    hits = engine.class_hits(classifier=run_results.classifier, labels=class_names,
                             queries=encoder.embed_inputs(inputs=image), top_k=settings.top_k)[0]
    target_label = valid_ds.get_label(target_label_idx)
    predicted_labels = [hit["label"] for hit in hits]
    utils.print_stats({
        "Text index" if text else "Image index": image_idx,
        "Text" if text else "Image path": valid_ds.get_text(image_idx) if text else valid_ds.get_image_path(image_idx),
        "Target label": target_label,
        "Predicted labels": ", ".join(f"{hit['label']} ({hit['score']:.3f})" for hit in hits),
        "Correct": predicted_labels[0] == target_label,
        "Target is among predicted": target_label in predicted_labels,
    }, title="Manual checking")

# %% Visual checking: six random validation images with target and predicted labels (images only).
if searchable and not text:
    samples = [valid_ds[int(index)] for index in np.random.permutation(len(valid_ds))[:6]]
    inputs = torch.stack([image for image, _ in samples])
    visual.show_images(
        inputs=inputs, targets=[valid_ds.get_label(label_idx) for _, label_idx in samples],
        predictions=[row[0]["label"] for row in engine.class_hits(
            classifier=run_results.classifier, labels=class_names, queries=encoder.embed_inputs(inputs=inputs),
            top_k=1)],
        mean=data_config["mean"], std=data_config["std"], figsize=(6, 5), filename=out_dir / "examples.png",
    )
    print(f"Written: {out_dir / 'examples.png'}")
clock.mark("analysis and checks")
if args.profile:
    print(clock.describe())
