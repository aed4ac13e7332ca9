"""Every ``#%%`` cell of the research script in a real Spyder kernel, run by Spyder's own ``%runcell`` magic.

Inside the kernel, ``%runcell`` asks Spyder's editor for the cell's text and the file's code. A small stand-in
answers those two requests the way the editor splits cells (a line starting with ``#%%`` or ``# %%`` opens a cell);
the kernel, the magic and Spyder's execution of the cell stay real. The script's constants are edited as a user
would, in a copy of the script.
"""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
from conftest import REPO_ROOT, SCRIPT, topic_sentences

pytest.importorskip("spyder_kernels")
jupyter_client = pytest.importorskip("jupyter_client")

STAND_IN = '''
import spyder_kernels.customize.code_runner as _code_runner


def _split_cells(filename):
    cells, current = [], []
    with open(filename, encoding="utf-8") as stream:
        for line in stream:
            if line.lstrip().startswith(("#%%", "# %%")) and current:
                cells.append("".join(current))
                current = []
            current.append(line)
    cells.append("".join(current))
    return cells


class _EditorStandIn:
    def run_cell(self, cell_id, filename):
        return _split_cells(filename)[int(cell_id)]

    def get_file_code(self, filename, save_all=True):
        with open(filename, encoding="utf-8") as stream:
            return stream.read()


_code_runner.frontend_request = lambda blocking=True: _EditorStandIn()
'''


def cell_count(path) -> int:
    lines = path.read_text(encoding="utf-8").splitlines()
    markers = sum(line.lstrip().startswith(("#%%", "# %%")) for line in lines)
    return markers + (0 if lines[0].lstrip().startswith(("#%%", "# %%")) else 1)


@pytest.fixture
def spyder_kernel(tmp_path, monkeypatch):
    spec = tmp_path / "jupyter" / "kernels" / "spyder"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "spyder_kernels.console", "-f", "{connection_file}"],
        "display_name": "Spyder", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    manager = jupyter_client.KernelManager(kernel_name="spyder")
    # the repository on the kernel's path, as Spyder's PYTHONPATH manager puts a project there
    manager.start_kernel(cwd=str(tmp_path), env={**os.environ, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1",
                                                 "PYTHONPATH": str(REPO_ROOT)})
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        yield client
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def execute(client, code: str, *, timeout: float = 600) -> tuple[str, list[str]]:
    """Run ``code`` in the kernel; return what it printed and the errors it raised (Spyder prints cell errors)."""
    printed, errors = [], []

    def collect(message):
        kind, content = message["msg_type"], message["content"]
        if kind == "stream":
            printed.append(content["text"])
        elif kind == "error":
            errors.append(f"{content['ename']}: {content['evalue']}")

    reply = client.execute_interactive(code, timeout=timeout, output_hook=collect)
    if reply["content"]["status"] == "error":
        errors.append(f"{reply['content']['ename']}: {reply['content']['evalue']}")
    return "".join(printed), errors


@pytest.mark.parametrize("modality", ["image", "text"])
def test_every_cell_runs_in_order_in_a_spyder_kernel_and_any_cell_reruns(spyder_kernel, modality, tmp_path, request):
    script = tmp_path / SCRIPT.name
    constants = {"DEVICE": "cpu", "RUNS": 3, "TOPK": 2, "OUT_DIR": str(tmp_path / "out"), "CLASSIFIER": "decorrelated"}
    if modality == "image":
        constants.update(DATASET_PATH=str(request.getfixturevalue("image_folder")), MODEL_NAME="tf_efficientnet_lite0",
                         WEIGHTS=str(request.getfixturevalue("lite0_weights")))
    else:
        rows = topic_sentences(per_class=10)
        path = tmp_path / "topics.csv"
        path.write_text("label,text\n" + "".join(f"{label},{text}\n" for label, text in rows), encoding="utf-8")
        constants.update(DATASET_PATH=str(path), MODEL_NAME=str(request.getfixturevalue("minilm_folder")))
    text = SCRIPT.read_text(encoding="utf-8")
    for name, value in constants.items():
        text, count = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", text, count=1, flags=re.M)
        assert count == 1, name
    script.write_text(text, encoding="utf-8")
    _, errors = execute(spyder_kernel, STAND_IN)
    assert errors == []
    cells = cell_count(script)
    assert cells >= 10
    outputs = []
    for index in range(cells):
        printed, errors = execute(spyder_kernel, f"%runcell -i {index} {script}")
        assert errors == [], f"cell {index}: {errors}\n{printed[-2000:]}"
        outputs.append(printed)
    everything = "".join(outputs)
    assert re.search(r"^Accuracy: 1\.0000 ± 0\.0000 \(95% confidence, n=3\)$", everything, re.M)
    assert "Classifier: DecorrelatedClassifier()" in everything
    assert "Target is among predicted: True" in everything
    assert (tmp_path / "out" / "results.json").exists()
    assert (tmp_path / "out" / "examples.png").exists() == (modality == "image")
    assert ("Text: " in everything) == (modality == "text")
    final_stats = next(index for index, printed in enumerate(outputs) if "-- Final stats --" in printed)
    again, errors = execute(spyder_kernel, f"%runcell -i {final_stats} {script}")
    assert errors == [] and again == outputs[final_stats].replace(
        re.search(r"Total duration: .*\n", outputs[final_stats]).group(0),
        re.search(r"Total duration: .*\n", again).group(0),
    )
