from __future__ import annotations

import io

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

import visual

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MAGIC = {".png": b"\x89PNG", ".pdf": b"%PDF", ".svg": b"<?xml"}


@pytest.fixture(autouse=True)
def _headless(monkeypatch):
    """Fail on any attempt to show a figure, and close whatever a test leaves open."""
    assert matplotlib.get_backend().lower() == "agg"

    def refuse(*args, **kwargs):
        raise AssertionError("a figure was shown under a non-interactive backend")

    monkeypatch.setattr(plt, "show", refuse)
    monkeypatch.setattr(Figure, "show", refuse)
    yield
    plt.close("all")


def _normalised(images: np.ndarray) -> torch.Tensor:
    """HWC images in [0, 1] -> normalised CHW batch, as the model's transform produces."""
    chw = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2)
    return (chw - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_show_images_denormalises_and_marks_wrong_predictions():
    rng = np.random.default_rng(0)
    images = rng.random((4, 5, 6, 3))
    images[0, 0, 0] = [0.0, 0.5, 1.0]
    inputs = _normalised(images)
    inputs[1] += 10.0  # far outside the valid range: must be clipped, not wrapped
    fig = visual.show_images(
        inputs=inputs,
        targets=["cat", "dog", "owl", "bee"],
        predictions=["cat", "cat", "owl", "ant"],
        mean=MEAN,
        std=STD,
    )
    assert isinstance(fig, Figure)
    axes = fig.axes
    assert len(axes) == 6
    np.testing.assert_allclose(axes[0].images[0].get_array(), images[0], atol=1e-6)
    np.testing.assert_allclose(axes[1].images[0].get_array(), np.ones((5, 6, 3)))
    assert axes[1].get_title() == "targ.: dog\npred.: cat"
    colours = [to_rgba(ax.title.get_color()) for ax in axes[:4]]
    assert colours == [to_rgba("black"), to_rgba("red"), to_rgba("black"), to_rgba("red")]
    assert [len(ax.images) for ax in axes] == [1, 1, 1, 1, 0, 0]
    assert not any(ax.axison for ax in axes)
    assert plt.fignum_exists(fig.number)


def test_show_images_keeps_only_six():
    inputs = _normalised(np.full((8, 4, 4, 3), 0.5))
    labels = [str(i) for i in range(8)]
    fig = visual.show_images(inputs=inputs, targets=labels, predictions=labels, mean=MEAN, std=STD)
    assert [ax.get_title() for ax in fig.axes] == [f"targ.: {i}\npred.: {i}" for i in range(6)]


@pytest.mark.parametrize(
    ("inputs", "targets", "message"),
    [
        (torch.zeros(2, 3, 4, 4), ["a"], "match"),
        (torch.zeros(0, 3, 4, 4), [], "non-empty"),
        (torch.zeros(2, 1, 4, 4), ["a", "b"], "RGB"),
    ],
)
def test_show_images_rejects_bad_input(inputs, targets, message):
    with pytest.raises(ValueError, match=message):
        visual.show_images(inputs=inputs, targets=targets, predictions=targets, mean=MEAN, std=STD)


@pytest.mark.parametrize("suffix", [".png", ".pdf", ".svg", ".PNG"])
def test_saving_uses_the_suffix_format_and_closes(tmp_path, suffix):
    filename = tmp_path / "figs" / f"caf{suffix}"
    fig = visual.draw_cumulative_accuracy(
        shares=np.linspace(0, 1, 5), cum_accs=[0.2, 0.4, 0.6, 0.8, 1.0], filename=filename
    )
    assert isinstance(fig, Figure)
    assert filename.read_bytes().startswith(MAGIC[suffix.lower()])
    assert [path.name for path in filename.parent.iterdir()] == [filename.name]
    assert not plt.fignum_exists(fig.number)


def test_unknown_suffix_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="suffixes"):
        visual.draw_cumulative_accuracy(shares=[0, 1], cum_accs=[0.5, 1.0], filename=tmp_path / "caf.xyz")
    assert list(tmp_path.iterdir()) == []
    assert plt.get_fignums() == []


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    filename = tmp_path / "caf.png"
    filename.write_bytes(b"old")

    def broken_savefig(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        visual.draw_cumulative_accuracy(shares=[0, 1], cum_accs=[0.5, 1.0], filename=filename)
    assert filename.read_bytes() == b"old"
    assert [path.name for path in tmp_path.iterdir()] == ["caf.png"]
    assert plt.get_fignums() == []


def test_interactive_backend_shows_when_not_saving(monkeypatch):
    shown = []
    monkeypatch.setattr(visual, "_is_interactive_backend", lambda: True)
    monkeypatch.setattr(Figure, "show", lambda self: shown.append(self))
    fig = visual.draw_cumulative_accuracy(shares=[0, 1], cum_accs=[0.5, 1.0])
    assert shown == [fig]


def test_cumulative_accuracy_plot_with_band():
    shares = np.linspace(0, 1, 5)
    cum_accs = np.array([0.5, 0.6, 0.7, 0.9, 1.0])
    low, high = cum_accs - 0.05, np.minimum(cum_accs + 0.05, 1.0)
    fig = visual.draw_cumulative_accuracy(shares=shares, cum_accs=cum_accs, band=(low, high))
    ax = fig.axes[0]
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_xydata(), np.column_stack([shares, cum_accs]))
    assert line.get_marker() == "o"
    (band,) = ax.collections
    vertices = band.get_paths()[0].vertices
    assert vertices[:, 1].min() == pytest.approx(low.min())
    assert vertices[:, 1].max() == pytest.approx(high.max())
    assert ax.get_legend() is not None
    assert ax.get_xlim() == (0.0, 1.0)


def test_cumulative_accuracy_plot_without_band():
    fig = visual.draw_cumulative_accuracy(shares=[0, 0.5, 1], cum_accs=[0.2, 0.5, 1.0])
    assert len(fig.axes[0].collections) == 0
    assert fig.axes[0].get_legend() is None


def test_cumulative_accuracy_plot_rejects_bad_band():
    with pytest.raises(ValueError, match="band"):
        visual.draw_cumulative_accuracy(shares=[0, 1], cum_accs=[0.5, 1.0], band=([0.4], [0.6, 1.0]))
    with pytest.raises(ValueError, match="same length"):
        visual.draw_cumulative_accuracy(shares=[0, 0.5, 1], cum_accs=[0.5, 1.0])


def test_confusion_matrix_small_is_annotated():
    confusion = np.array([[5, 1, 0], [0, 6, 0], [2, 0, 4]])
    fig = visual.draw_confusion_matrix(confusion=confusion, labels=["a", "b", "c"])
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), confusion)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert sorted(t.get_text() for t in ax.texts) == sorted(str(v) for v in confusion.ravel())


def test_normalised_confusion_matrix_shows_shares_of_the_true_class_and_a_literal_title():
    confusion = np.array([[3, 1], [0, 0]])
    fig = visual.draw_confusion_matrix(confusion=confusion, labels=["a", "b"], normalize=True, title="cost $5")
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), [[0.75, 0.25], [0.0, 0.0]])
    assert sorted(t.get_text() for t in ax.texts) == ["0.00", "0.00", "0.25", "0.75"]
    assert ax.get_title() == r"cost \$5"
    fig.savefig(io.BytesIO(), format="png")  # a bare $ would make matplotlib's math parser fail here


def test_confusion_matrix_scales_to_100_classes():
    labels = [f"class {i}" for i in range(100)]
    small = visual.draw_confusion_matrix(confusion=np.eye(5), labels=labels[:5])
    fig = visual.draw_confusion_matrix(confusion=np.eye(100) * 3, labels=labels)
    ax = fig.axes[0]
    assert fig.get_size_inches()[0] > small.get_size_inches()[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == labels
    assert ax.get_xticklabels()[0].get_fontsize() < small.axes[0].get_xticklabels()[0].get_fontsize()
    assert len(ax.texts) == 0


def test_confusion_matrix_skips_tick_labels_beyond_100_classes():
    labels = [f"c{i}" for i in range(150)]
    fig = visual.draw_confusion_matrix(confusion=np.zeros((150, 150)), labels=labels)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == labels[::2]


def test_confusion_matrix_rejects_mismatch():
    with pytest.raises(ValueError, match="square"):
        visual.draw_confusion_matrix(confusion=np.zeros((3, 3)), labels=["a", "b"])


def test_embedding_map_colours_classes_and_marks_means():
    coords = np.array([[0.0, 0.0], [0.1, 0.2], [5.0, 5.0], [5.2, 4.9], [9.0, 0.0]])
    targets = torch.tensor([0, 0, 1, 1, 2])
    means = np.array([[0.05, 0.1], [5.1, 4.95], [9.0, 0.0]])
    fig = visual.draw_embedding_map(coords=coords, targets=targets, labels=["ant", "bee", "cat"], mean_coords=means)
    ax = fig.axes[0]
    points, centres = ax.collections
    np.testing.assert_allclose(points.get_offsets(), coords)
    colours = points.get_facecolors()
    assert np.allclose(colours[0], colours[1]) and not np.allclose(colours[0], colours[2])
    np.testing.assert_allclose(centres.get_offsets(), means)
    np.testing.assert_allclose(centres.get_facecolors()[:, :3], colours[[0, 2, 4], :3])
    assert centres.get_paths()[0] != points.get_paths()[0]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["ant", "bee", "cat"]


def test_embedding_map_many_classes_has_no_legend_but_distinct_colours():
    num_classes = 30
    targets = np.arange(num_classes)
    coords = np.random.default_rng(1).random((num_classes, 2))
    fig = visual.draw_embedding_map(coords=coords, targets=targets, labels=[str(i) for i in range(num_classes)])
    ax = fig.axes[0]
    assert ax.get_legend() is None
    assert len(ax.collections) == 1
    assert len({tuple(c) for c in ax.collections[0].get_facecolors()}) == num_classes


def test_embedding_map_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        visual.draw_embedding_map(coords=np.zeros((3, 3)), targets=[0, 0, 0], labels=["a"])
    with pytest.raises(ValueError, match="label indexes"):
        visual.draw_embedding_map(coords=np.zeros((2, 2)), targets=[0, 1], labels=["a"])
    with pytest.raises(ValueError, match="mean_coords"):
        visual.draw_embedding_map(coords=np.zeros((2, 2)), targets=[0, 0], labels=["a"], mean_coords=np.zeros((2, 2)))


def test_labels_with_control_characters_reach_neither_the_figure_nor_the_terminal_raw(tmp_path):
    import warnings

    labels = ["evil\x1b[31m", "two\rlines", "caf\udce9"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figure = visual.draw_confusion_matrix(confusion=np.eye(3), labels=labels, filename=tmp_path / "c.png",
                                              title="title \x1b[0m")
    ticks = [tick.get_text() for tick in figure.axes[0].get_yticklabels()]
    assert ticks == ["evil\\x1b[31m", "two\\rlines", "caf\\udce9"]
    assert not any(char in str(warning.message) for warning in caught for char in "\x1b\r")
    assert (tmp_path / "c.png").stat().st_size > 1000
