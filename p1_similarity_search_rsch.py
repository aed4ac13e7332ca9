"""Part 1: image classification with a pretrained model and no fine-tuning, by similarity search.

Every training image becomes an embedding, each class is represented by the mean of its embeddings, and a query
is labelled with the most similar class vector (cosine). Accuracy is averaged over many random train/validation
partitions and reported with a Student-t confidence interval.

Run the ``#%%`` cells one by one in Spyder (or another IDE), or the whole file::

    python p1_similarity_search_rsch.py --dataset DIR --model tf_efficientnet_lite0 --weights FILE --runs 20

``python p1_similarity_search_rsch.py --help`` lists every option; the upper-case constants below are the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import random
import sys

import numpy as np
import pandas as pd
import torch

import banerjee
import cumacc
import engine
import protocol
import prototypes
import randomness
import store
import utils
import visual

AUGMENT_ENCODE_DATA = False
AUGMENT_EVAL_DATA = False
BATCH_SIZE = 32
CLASSIFIER = "mean"
CLASS_ACCURACY_THRESHOLD = 0.8
CONFIDENCE = 0.95
DATASET_PATH = "../data/banerjee-animal-90/animals"
FORCE_CPU = False
KAGGLE_DATASET = "iamsouravbanerjee/animal-image-dataset-90-different-animals"
MODALITY = "auto"
MODEL_NAME = "tiny_vit_11m_224.dist_in22k_ft_in1k"
NUM_INTERVALS = 20
NUM_WORKERS = 0
OUT_DIR = "results"
PROFILE = False
PROTOCOL = "cached"
RANDOM_SEED = 17
RUNS = 20
SAVE_EMBEDDINGS = False
SHORT_RUN_BATCHES = None
TEXT_COLUMN = "text"
LABEL_COLUMN = "label"
TEXT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
TOPK = 4
VALID_SHARE = 0.2


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset", default=DATASET_PATH,
        help="class-folder dataset (one sub-folder per class, of images or .txt files) or a CSV/TSV of sentences",
    )
    parser.add_argument("--download", action="store_true", help="fetch Banerjee's Animal-90 with kagglehub")
    parser.add_argument(
        "--modality", choices=("auto", "image", "text"), default=MODALITY,
        help="auto: text for a CSV/TSV file or folders of .txt files, images otherwise",
    )
    parser.add_argument("--text-column", default=TEXT_COLUMN, help="CSV/TSV column that holds the sentences")
    parser.add_argument(
        "--label-column", default=LABEL_COLUMN, help="CSV/TSV label column (several, comma-separated, are joined)"
    )
    parser.add_argument(
        "--model", default=None,
        help=f"timm model name for images (default {MODEL_NAME}); sentence-transformers name or local folder for "
        f"text (default {TEXT_MODEL_NAME})",
    )
    parser.add_argument("--weights", default=None, help="local weights file instead of a hub download")
    parser.add_argument("--runs", type=int, default=RUNS, help="number of random partitions")
    parser.add_argument("--valid-share", type=float, default=VALID_SHARE, help="validation share of each class")
    parser.add_argument("--top-k", type=int, default=TOPK)
    parser.add_argument(
        "--classifier", choices=tuple(prototypes.CLASSIFIERS), default=CLASSIFIER,
        help="mean: the article's class mean (cosine); decorrelated: centred ridge prototypes, alpha by GCV",
    )
    parser.add_argument("--confidence", type=float, default=CONFIDENCE, help="two-sided interval confidence")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--workers", type=int, default=NUM_WORKERS, help="DataLoader worker processes")
    parser.add_argument("--seed", type=int, default=RANDOM_SEED)
    parser.add_argument("--cpu", action="store_true", default=FORCE_CPU, help="never use CUDA")
    parser.add_argument("--out", default=OUT_DIR, help="directory for plots, CSV and JSON results")
    parser.add_argument(
        "--protocol", choices=("cached", "original"), default=PROTOCOL,
        help="cached: encode every image once; original: re-encode each partition like the article",
    )
    parser.add_argument("--cache-dir", default=None, help="keep per-image embeddings here between runs")
    parser.add_argument("--augment-encode", action="store_true", default=AUGMENT_ENCODE_DATA)
    parser.add_argument("--augment-eval", action="store_true", default=AUGMENT_EVAL_DATA)
    parser.add_argument("--short-run", type=int, default=SHORT_RUN_BATCHES, metavar="BATCHES",
                        help="original protocol only: stop each pass after this many batches")
    parser.add_argument("--strict", action="store_true", help="stop on unreadable images instead of skipping them")
    parser.add_argument("--resume", action="store_true", help="continue the partitions saved in --out")
    parser.add_argument("--save-embeddings", action="store_true", default=SAVE_EMBEDDINGS)
    parser.add_argument("--analysis", action="store_true", help="also write confusion, retrieval and t-SNE outputs")
    parser.add_argument("--profile", action="store_true", default=PROFILE)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.batch_size < 1 or args.top_k < 1 or args.workers < 0:
        parser.error("--runs, --batch-size and --top-k must be at least 1, and --workers at least 0.")
    if not 0.0 < args.confidence < 1.0:
        parser.error(f"--confidence must lie strictly between 0 and 1, got {args.confidence}.")
    try:
        banerjee.check_shares(valid_share=args.valid_share, test_share=0.0)
    except banerjee.DatasetError as error:
        parser.error(f"--valid-share: {error}")
    if (args.augment_encode or args.augment_eval) and args.protocol == "cached":
        print("Augmentation draws new images every pass, so it bypasses the embedding cache: --protocol original.")
        args.protocol = "original"
    return args


def resolve_dataset(*, dataset: str, download: bool) -> pathlib.Path:
    """The dataset (class-folder root or sentence file): the given path, or the Animal-90 folder kagglehub downloads."""
    if download:
        import kagglehub

        try:
            root = pathlib.Path(kagglehub.dataset_download(KAGGLE_DATASET))
        except Exception as error:
            raise SystemExit(
                f"Could not download {KAGGLE_DATASET} with kagglehub ({type(error).__name__}: {error}). It needs "
                "network access and Kaggle credentials; otherwise download it by hand and pass --dataset DIR."
            ) from error
        return next(path for path in (root / "animals" / "animals", root / "animals", root) if path.is_dir())
    path = pathlib.Path(dataset).expanduser()
    if not path.exists():
        raise SystemExit(
            f"No dataset at {path.resolve()}. Pass --dataset DIR (one sub-folder of images or .txt files per class) "
            f"or a CSV/TSV file of sentences, or --download to fetch Banerjee's Animal-90 ({KAGGLE_DATASET}) with "
            "kagglehub."
        )
    return path


def write_json(path: pathlib.Path, content: dict) -> None:
    """JSON with intervals as their fields (mean, half_width, ...) and anything else unusual as text."""

    def plain(value):
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)

    with store.atomic_path(path) as temporary:
        temporary.write_text(json.dumps(content, indent=2, default=plain), encoding="utf-8")


def write_csv(path: pathlib.Path, frame: pd.DataFrame) -> None:
    with store.atomic_path(path) as temporary:
        frame.to_csv(temporary, index=False)


if __name__ == "__main__":
    #%% Settings.
    args = parse_args(sys.argv[1:])
    print("Part 1: similarity search using a pretrained model.")
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    #%% Create a model, a dataset maker and an encoder.
    device = utils.get_device(force_cpu=args.cpu)
    utils.check_cuda_support(inform=True)
    randomness.set_determinism(seed=args.seed)
    generator = randomness.make_torch_generator(seed=args.seed)
    try:
        dsm = banerjee.make_dataset_maker(
            dataset_path=resolve_dataset(dataset=args.dataset, download=args.download), modality=args.modality,
            text_column=args.text_column, label_column=args.label_column, strict=args.strict,
        )
    except banerjee.DatasetError as error:
        raise SystemExit(str(error)) from error
    text = dsm.modality == "text"
    if text and (args.augment_encode or args.augment_eval or args.weights):
        raise SystemExit("--augment-encode, --augment-eval and --weights apply to image models only; a local "
                         "sentence-transformers model is a folder: pass it as --model.")
    labels = dsm.get_labels()
    if args.top_k > len(labels):
        raise SystemExit(f"--top-k {args.top_k} exceeds the {len(labels)} classes of {dsm.dataset_path}.")
    model_name = args.model or (TEXT_MODEL_NAME if text else MODEL_NAME)
    classifier = prototypes.make_classifier(args.classifier)
    encoder = engine.create_encoder(
        modality=dsm.modality, model_name=model_name, weights=args.weights, device=device, classifier=classifier,
        config=argparse.Namespace(topk=args.top_k, short_run_batches=args.short_run),
    )
    model = encoder.model
    data_config = eval_transform = encode_transform = query_transform = None
    if not text:
        data_config, eval_transform = engine.eval_transform(model)
        augmenting_transform = banerjee.augment_data(data_config)
        encode_transform = augmenting_transform if args.augment_encode else eval_transform
        query_transform = augmenting_transform if args.augment_eval else eval_transform
    print(f"Dataset: {dsm.dataset_path} ({len(labels)} classes, {dsm.get_num_images()} {dsm.sample_kind}s, "
          f"{len(dsm.skipped)} skipped); model: {engine.model_id(model)}; device: {device}")

    #%% Encode and evaluate over random partitions.
    run_log = out_dir / "runs.jsonl"
    completed = protocol.load_run_records(run_log) if args.resume else []
    common = dict(
        encoder=encoder, maker=dsm, runs=args.runs, valid_share=args.valid_share, batch_size=args.batch_size,
        workers=args.workers, generator=generator, top_k=args.top_k, classifier=classifier, completed=completed,
        run_log=run_log, inform=True,
    )
    try:
        with utils.Profile(active=args.profile) as profiler:
            if args.protocol == "cached":
                cache = store.EmbeddingCache(args.cache_dir) if args.cache_dir else None
                run_results = protocol.run_cached_protocol(
                    transform=eval_transform, cache=cache, **common
                )
            else:
                run_results = protocol.run_original_protocol(
                    encode_transform=encode_transform, eval_transform=query_transform,
                    augment_seed=args.seed if args.augment_encode or args.augment_eval else None, **common,
                )
    except KeyboardInterrupt:
        raise SystemExit(f"Interrupted. Finished partitions are kept in {run_log}; rerun with --resume to go on.")
    profiler.dump(filename=out_dir / "profile", sort_by="cumulative")

    #%% Final stats over the partitions.
    accuracy = run_results.accuracy(confidence=args.confidence)
    topk_accuracy = run_results.topk_accuracy(confidence=args.confidence)
    final_stats = {
        "model_name": engine.model_id(model),
        "num_trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "embedding_dim": encoder.num_features,
        "dataset": str(dsm.dataset_path),
        "num_labels": len(labels),
        "num_valid_images": run_results[-1].num_images,
        "runs": len(run_results),
        "protocol": args.protocol,
        "classifier": repr(classifier),
        "accuracy": accuracy,
        "topk": args.top_k,
        "topk_accuracy": topk_accuracy,
        "duration": sum(r.seconds for r in run_results),
    }
    engine.print_stats({
        "Model name": final_stats["model_name"],
        "Number of trainable model parameters": final_stats["num_trainable_params"],
        "Size of an embedding vector": final_stats["embedding_dim"],
        "Dataset": f"{final_stats['dataset']} ({final_stats['num_labels']} classes)",
        "Validation images per partition": final_stats["num_valid_images"],
        "Partitions": f"{final_stats['runs']} ({args.protocol} protocol)",
        "Classifier": final_stats["classifier"],
        "Accuracy": accuracy,
        f"Top {args.top_k} accuracy": topk_accuracy,
        "Calculation duration": f"{final_stats['duration']:.1f} s",
    }, title="Final stats")

    #%% Per-class accuracy and the cumulative accuracy function.
    # Every partition validates the same number of images per class, so pooling equals averaging over runs.
    class_accuracy = cumacc.class_accuracies(
        targets=[t for r in run_results for t in r.targets],
        predictions=[p for r in run_results for p in r.predictions],
        num_labels=len(labels),
    )
    cum_accuracies, class_shares = cumacc.cumulative_accuracy(accuracies=class_accuracy, num_intervals=NUM_INTERVALS)
    visual.draw_cumulative_accuracy(
        shares=class_shares, cum_accs=cum_accuracies, figsize=(5, 5), filename=out_dir / "cumacc.png"
    )

    #%% The least accurate classes.
    least_accurate_classes = cumacc.least_accurate_classes(
        accuracies=class_accuracy, labels=labels, threshold=CLASS_ACCURACY_THRESHOLD
    )
    print(f"Classes with mean accuracy <= {CLASS_ACCURACY_THRESHOLD}:")
    for item in least_accurate_classes:
        print(f"  {item['label']}: {item['accuracy']:.3f}")

    #%% Save results (and, optionally, the class vectors of the last partition).
    write_csv(out_dir / "runs.csv", pd.DataFrame(
        [{key: getattr(r, key) for key in ("run", "accuracy", "topk_accuracy", "train_accuracy", "seconds")}
         for r in run_results]
    ))
    write_csv(out_dir / "class_accuracy.csv", pd.DataFrame({"label": labels, "accuracy": class_accuracy}))
    write_json(out_dir / "results.json", {
        "settings": vars(args),
        "final_stats": final_stats,
        "accuracies": [r.accuracy for r in run_results],
        "topk_accuracies": [r.topk_accuracy for r in run_results],
        "least_accurate_classes": least_accurate_classes,
        "skipped_files": [{"path": str(path), "reason": reason} for path, reason in dsm.skipped],
    })
    if run_results.classifier is not None:
        encoder.set_classifier(
            classifier=run_results.classifier, labels=[labels[i] for i in run_results.classifier.classes_]
        )
    if args.save_embeddings and encoder.embeddings is not None:
        store.save_embeddings(
            embeddings=encoder.embeddings.cpu().numpy(), targets=encoder.labels,
            filename=out_dir / f"embeddings-{pathlib.Path(model_name).name}", inform=True,
        )
    print(f"Results written to {out_dir.resolve()}")

    #%% Analysis (--analysis): confusion, per-class intervals, retrieval P@K, prototype variants, t-SNE, CI check.
    embeddings, image_targets = run_results.embeddings, run_results.targets
    if args.analysis and embeddings is None:
        print("--analysis needs the per-image embeddings of the cached protocol; skipped.")
    if args.analysis and embeddings is not None:
        import analysis

        per_run = dict(
            targets_per_run=run_results.targets_per_run, predictions_per_run=run_results.predictions_per_run
        )
        partitions = run_results.partitions
        confusion = analysis.confusion_over_partitions(**per_run, num_labels=len(labels))
        visual.draw_confusion_matrix(confusion=confusion, labels=labels, filename=out_dir / "confusion.png")
        confused_pairs = analysis.most_confused_pairs(confusion=confusion, labels=labels)
        per_class = analysis.per_class_accuracy(**per_run, labels=labels, confidence=args.confidence)
        band = analysis.cumulative_accuracy_band(
            **per_run, num_labels=len(labels), num_intervals=NUM_INTERVALS, confidence=args.confidence
        )
        visual.draw_cumulative_accuracy(
            shares=band["share"], cum_accs=band["mean"], band=(band["low"], band["high"]), figsize=(5, 5),
            filename=out_dir / "cumacc_band.png",
        )
        weak_classes = analysis.least_accurate_with_interval(per_class=per_class, threshold=CLASS_ACCURACY_THRESHOLD)
        retrieval = analysis.retrieval_precision(
            embeddings=embeddings, targets=image_targets, partitions=partitions, confidence=args.confidence
        )
        prototypes = analysis.compare_prototypes(
            embeddings=embeddings, targets=image_targets, partitions=partitions, top_k=args.top_k,
            confidence=args.confidence,
        )
        last_valid = partitions[-1][1]
        coords, mean_coords = analysis.tsne_map(
            embeddings=embeddings[last_valid], targets=image_targets[last_valid], num_labels=len(labels),
            seed=args.seed,
        )
        visual.draw_embedding_map(
            coords=coords, targets=image_targets[last_valid].numpy(), labels=labels, mean_coords=mean_coords,
            filename=out_dir / "tsne.png",
        )
        coverage = analysis.ci_coverage(
            embeddings=embeddings, targets=image_targets, valid_share=args.valid_share, confidence=args.confidence,
            seed=args.seed,
        )
        for name, table in (("confused_pairs", confused_pairs), ("class_accuracy_intervals", per_class),
                            ("least_accurate_intervals", weak_classes), ("retrieval", retrieval),
                            ("prototypes", prototypes)):
            write_csv(out_dir / f"{name}.csv", table)
        write_json(out_dir / "ci_coverage.json", coverage)
        with pd.option_context("display.width", 160, "display.max_columns", 20):
            print("-- Most confused pairs --", confused_pairs.head(10), sep="\n")
            print("-- Retrieval over individual images --", retrieval, sep="\n")
            print("-- Prototype variants on the same partitions --", prototypes, sep="\n")
        print("-- Confidence interval coverage --", coverage, sep="\n")

    #%% Manual checking: one random validation sample of the last partition.
    valid_ds = dsm.datasets_from_indexes(indexes=torch.tensor(run_results[-1].valid_indexes),
                                         transform=eval_transform)
    if encoder.embeddings is not None and len(valid_ds) > 0:
        image_idx = random.randrange(len(valid_ds))
        image, target_label_idx = valid_ds[image_idx]
        hits = encoder.infer(inputs=image)[0]
        target_label = valid_ds.get_label(target_label_idx)
        predicted_labels = [hit["label"] for hit in hits]
        print("-- Manual checking --")
        print(f"Text: {valid_ds.get_text(image_idx)}" if text else f"Image path: {valid_ds.get_image_path(image_idx)}")
        print("Target label:", target_label)
        print("Predicted labels:", ", ".join(f"{hit['label']} ({hit['score']:.3f})" for hit in hits))
        print("Correct:", predicted_labels[0] == target_label)
        print("Target is among predicted:", target_label in predicted_labels)
        print("---------------------")

    #%% Visual checking: six random validation images with target and predicted labels (images only).
    if encoder.embeddings is not None and len(valid_ds) > 0 and not text:
        image_indexes = np.random.permutation(len(valid_ds))[:6]
        samples = [valid_ds[int(index)] for index in image_indexes]
        inputs = torch.stack([image for image, _ in samples])
        hits = encoder.infer(inputs=inputs)
        visual.show_images(
            inputs=inputs,
            targets=[valid_ds.get_label(label_idx) for _, label_idx in samples],
            predictions=[row[0]["label"] for row in hits],
            mean=data_config["mean"], std=data_config["std"], figsize=(6, 5), filename=out_dir / "examples.png",
        )
        print(f"Prediction grid written to {out_dir / 'examples.png'}")
