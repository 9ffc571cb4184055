"""The Python examples of README.md and of every docs/*.md page run as written: each page's blocks in order,
in one namespace per page (as a reader of that page would), and the values their comments promise hold.

Blocks fenced as ```py need the Hugging Face Hub and are not run here; tests/test_hub.py covers the
same calls against a local Hub stand-in. ```bash blocks are not run (tests/ runs the commands themselves)."""
import re
from pathlib import Path
from typing import Any, Callable, Dict

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)", flags=re.M)
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", flags=re.S)

# pages with nothing to run; every other page must have at least one ```python block
PAGES_WITHOUT_EXAMPLES = {"docs/measurements.md"}


def python_blocks(page: Path) -> list:
    return PYTHON_BLOCK.findall(page.read_text())


def name_of(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def readme(ns: Dict[str, Any]) -> None:
    assert ns["logits"].shape == (1, 10)
    assert tuple(ns["features"].shape) == (1, 2048, 7, 7)
    assert ns["wszoo"].list_models("resnet*")[:3] == ["resnet18_gn_ws", "resnet34_gn_ws", "resnet50_gn_ws"]
    assert ns["wszoo"].list_pretrained("*50x1*")[0] == "resnetv2_50x1_bit.goog_distilled_in1k"
    bit_cfg = ns["bit"].pretrained_cfg
    assert (bit_cfg["input_size"], bit_cfg["crop_pct"]) == ((3, 448, 448), 1.0)


def usage(ns: Dict[str, Any]) -> None:
    readme(ns)  # the same first example, with more around it
    assert [ns[k].shape[1] for k in ("c3", "c4", "c5")] == [512, 1024, 2048]
    assert len(ns["maps"]) == 2 and ns["final"].shape == (1, 960, 7, 7)
    assert tuple(ns["w"].shape) == (128, 64, 3, 3)


def retrofit(ns: Dict[str, Any]) -> None:
    report = ns["report"]  # torchvision's ResNet-50 converted to GN+WS in two lines
    assert (len(report.converted), len(report.skipped), len(report.norms)) == (53, 1, 53)
    assert str(report).startswith("converted 53 layer(s) to WS, kept 1 plain, replaced 53 norm(s)")


def detection(ns: Dict[str, Any]) -> None:
    assert ns["losses"].keys() >= {"loss_classifier", "loss_box_reg"}
    assert ns["detections"][0].keys() == {"boxes", "labels", "scores"}


def segmentation(ns: Dict[str, Any]) -> None:
    assert tuple(ns["logits"].shape) == (1, 3, 64, 64)
    assert int(ns["matrix"].sum()) == 60 * 64 == ns["metrics"]["pixels"]  # the 4 rows of 255 counted nowhere
    assert 0 <= ns["metrics"]["mIoU"] <= 100 and len(ns["metrics"]["IoU"]) == 3


def export(ns: Dict[str, Any]) -> None:
    report = ns["report"]  # written into the test's working directory
    assert report.format == "onnx" and Path(report.path).is_file() and Path(report.metadata_path).is_file()
    assert report.max_rel_diff <= report.tolerance


def reference(ns: Dict[str, Any]) -> None:
    from wszoo.layers import WS_STYLES

    assert sorted(ns["formulas"]) == sorted(WS_STYLES)  # every style of the table checked


def architecture(ns: Dict[str, Any]) -> None:
    assert type(ns["plain"]) is ns["nn"].Bilinear and ns["layer"].weight.grad is not None


PROMISES: Dict[str, Callable[[Dict[str, Any]], None]] = {
    "README.md": readme, "docs/usage.md": usage, "docs/retrofit.md": retrofit, "docs/detection.md": detection,
    "docs/export.md": export, "docs/reference.md": reference, "docs/architecture.md": architecture,
    "docs/segmentation.md": segmentation,
}


def test_every_page_is_found_and_fenced_as_the_test_reads_it():
    names = [name_of(page) for page in PAGES]
    assert len(names) >= 10 and set(PROMISES) | PAGES_WITHOUT_EXAMPLES <= set(names)
    for page in PAGES:
        languages = FENCE.findall(page.read_text())[0::2]  # openers only (every other fence closes)
        assert set(languages) <= {"python", "py", "bash", ""}, f"{name_of(page)}: a block fenced {languages}"
        assert bool(python_blocks(page)) != (name_of(page) in PAGES_WITHOUT_EXAMPLES), name_of(page)
    assert sum(len(python_blocks(page)) for page in PAGES) >= 14


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=name_of)
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # what an example writes (model.onnx ...) lands here
    namespace: Dict[str, Any] = {}
    exec(compile("\n".join(python_blocks(page)), name_of(page), "exec"), namespace)
    PROMISES.get(name_of(page), lambda ns: None)(namespace)
