"""``wszoo detect demo``: the newcomer's first detector, trained here, scored and drawn. A tiny recipe in
``make test`` (8 + 4 canvases, one epoch) checks what the user gets: the figures line naming its dataset, box AP
in [0, 100], a PNG of the size the panels make, a run ``wszoo detect eval`` scores again to the same figures, and
the one-line refusal of a used folder. The real demo, with the AP50 floor it measured, is ``slow``."""
import re

import pytest
from PIL import Image

from tests.data_fixtures import HAS_FMNIST
from tests.helpers import run_cli
from wszoo.detection.demo import DEMO_RECIPE, PICTURE, SHOWN, detect_demo
from wszoo.tools.showcase import grid_size

pytest.importorskip("pycocotools")
#: half the box AP50 `wszoo detect demo` measured (30.6, docs/detection.md and configs/trained_here/dense.json)
AP50_FLOOR = 15.3
FIGURES = re.compile(r"^Fashion-MNIST mosaics, (\d+) val images of (\d+) px \(items from Fashion-MNIST's test split\): "
                     r"box AP (\d+\.\d), AP50 (\d+\.\d)$", re.M)



@pytest.fixture(scope="module")
def tiny_demo(fmnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "det"
    lines = []
    result = detect_demo(out, data_dir=fmnist, log=lines.append, train_images=8, val_images=4, epochs=1, img_size=32)
    return out, result, "\n".join(lines)


def test_tiny_demo_prints_its_figures_and_draws_them(tiny_demo):
    out, result, printed = tiny_demo
    match = FIGURES.search(printed)
    assert match, printed
    assert (int(match[1]), int(match[2])) == (4, 32)
    for key, shown in (("bbox_AP", match[3]), ("bbox_AP50", match[4])):
        assert 0 <= result[key] <= 100 and f"{result[key]:.1f}" == shown
    with Image.open(out / PICTURE) as picture:
        assert picture.format == "PNG" and picture.size == grid_size(min(SHOWN, 4), 2)
        picture.load()
    assert f"wszoo detect eval --checkpoint {out / 'run' / 'last'}" in printed


def test_tiny_demo_run_scores_again_with_detect_eval(tiny_demo):
    out, result, _ = tiny_demo
    mosaic = out / "mosaic"
    code, stdout, stderr = run_cli(["detect", "eval", "--checkpoint", str(out / "run" / "last"), "--images",
                                    str(mosaic / "JPEGImages"), "--annotations",
                                    str(mosaic / "annotations" / "instances_val.json")])
    assert code == 0, stderr
    assert f"AP {result['bbox_AP']:.2f}  AP50 {result['bbox_AP50']:.2f}" in stdout


def test_demo_refuses_a_used_folder_in_one_line(tiny_demo):
    out, _, _ = tiny_demo
    before = sorted(p.name for p in out.iterdir())
    code, stdout, stderr = run_cli(["detect", "demo", "--output", str(out)])
    assert code == 2 and stdout == ""
    assert stderr.strip() == (f"wszoo detect demo: error: {out} is not empty: choose another folder or pass "
                              "--overwrite to replace the demo in it")
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FMNIST, reason="the real demo trains on Debian's dataset-fashion-mnist")
def test_the_real_demo_learns(tmp_path):
    code, stdout, stderr = run_cli(["detect", "demo", "--output", str(tmp_path / "demo")])
    assert code == 0, stderr
    match = FIGURES.search(stdout)
    assert match and int(match[1]) == DEMO_RECIPE["val_images"] == 50, stdout
    assert float(match[4]) >= AP50_FLOOR, match[0]
