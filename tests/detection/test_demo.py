"""``wszoo detect demo``: the newcomer's first detector, trained here, scored and drawn. A tiny recipe in
``make test`` (8 + 4 canvases, one epoch) checks what the user gets: the figures line naming its dataset, box AP
in [0, 100], a PNG of the size the panels make, a run ``wszoo detect eval`` scores again to the same figures, and
the one-line refusal of a used folder. The real demo, with the AP50 floor it measured, is ``slow``."""
import pytest

from tests.data_fixtures import HAS_FMNIST
from tests.demo_checks import assert_png_of_size, assert_refuses_a_used_folder, figures_line, run_tiny_demo
from tests.helpers import run_cli
from wszoo.detection.demo import DEMO_RECIPE, PICTURE, SHOWN, detect_demo
from wszoo.tools.showcase import grid_size

pytest.importorskip("pycocotools")
#: half the box AP50 `wszoo detect demo` measured (30.6, docs/detection.md and configs/trained_here/dense.json)
AP50_FLOOR = 15.3
FIGURES = figures_line(r"box AP (\d+\.\d), AP50 (\d+\.\d)")


@pytest.fixture(scope="module")
def tiny_demo(fmnist, tmp_path_factory):
    return run_tiny_demo(detect_demo, tmp_path_factory.mktemp("demo") / "det", fmnist)


def test_tiny_demo_prints_its_figures_and_draws_them(tiny_demo):
    out, result, printed = tiny_demo
    match = FIGURES.search(printed)
    assert match, printed
    assert (int(match[1]), int(match[2])) == (4, 32)
    for key, shown in (("bbox_AP", match[3]), ("bbox_AP50", match[4])):
        assert 0 <= result[key] <= 100 and f"{result[key]:.1f}" == shown
    assert_png_of_size(out / PICTURE, grid_size(min(SHOWN, 4), 2))
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
    assert_refuses_a_used_folder("detect", tiny_demo[0])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FMNIST, reason="the real demo trains on Debian's dataset-fashion-mnist")
def test_the_real_demo_learns(tmp_path):
    code, stdout, stderr = run_cli(["detect", "demo", "--output", str(tmp_path / "demo")])
    assert code == 0, stderr
    match = FIGURES.search(stdout)
    assert match and int(match[1]) == DEMO_RECIPE["val_images"] == 50, stdout
    assert float(match[4]) >= AP50_FLOOR, match[0]
