"""``wszoo segment demo``: the newcomer's first segmenter, trained here, scored and drawn. A tiny recipe in
``make test`` (8 + 4 canvases, one epoch) checks what the user gets: the figures line naming its dataset, mIoU and
pixel accuracy in [0, 100], a PNG of the size the panels make, a run ``wszoo segment eval`` scores again to the
same figures, and the one-line refusal of a used folder. The real demo, with the mIoU floor it measured, is
``slow``."""
import pytest

from tests.data_fixtures import HAS_FMNIST
from tests.demo_checks import assert_png_of_size, assert_refuses_a_used_folder, figures_line, run_tiny_demo
from tests.helpers import run_cli
from wszoo.segmentation.demo import PICTURE, SHOWN, segment_demo
from wszoo.tools.showcase import grid_size

#: half the mIoU `wszoo segment demo` measured (12.3, docs/segmentation.md and configs/trained_here/dense.json)
MIOU_FLOOR = 6.1
FIGURES = figures_line(r"mIoU (\d+\.\d), pixel accuracy (\d+\.\d)")


@pytest.fixture(scope="module")
def tiny_demo(fmnist, tmp_path_factory):
    return run_tiny_demo(segment_demo, tmp_path_factory.mktemp("demo") / "seg", fmnist)


def test_tiny_demo_prints_its_figures_and_draws_them(tiny_demo):
    out, result, printed = tiny_demo
    match = FIGURES.search(printed)
    assert match, printed
    assert (int(match[1]), int(match[2])) == (4, 32)
    for key, shown in (("mIoU", match[3]), ("pixel_acc", match[4])):
        assert 0 <= result[key] <= 100 and f"{result[key]:.1f}" == shown
    assert_png_of_size(out / PICTURE, grid_size(min(SHOWN, 4), 3))
    assert f"wszoo segment eval --checkpoint {out / 'run' / 'last'} --data-dir {out / 'mosaic'}" in printed


def test_tiny_demo_run_scores_again_with_segment_eval(tiny_demo):
    out, result, _ = tiny_demo
    code, stdout, stderr = run_cli(["segment", "eval", "--checkpoint", str(out / "run" / "last"), "--data-dir",
                                    str(out / "mosaic")])
    assert code == 0, stderr
    assert f"mIoU {result['mIoU']:.2f}  pixel_acc {result['pixel_acc']:.2f}" in stdout


def test_demo_refuses_a_used_folder_in_one_line(tiny_demo):
    assert_refuses_a_used_folder("segment", tiny_demo[0])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FMNIST, reason="the real demo trains on Debian's dataset-fashion-mnist")
def test_the_real_demo_learns(tmp_path):
    code, stdout, stderr = run_cli(["segment", "demo", "--output", str(tmp_path / "demo")])
    assert code == 0, stderr
    match = FIGURES.search(stdout)
    assert match and int(match[1]) == 100, stdout
    assert float(match[3]) >= MIOU_FLOOR, match[0]
