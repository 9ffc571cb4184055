"""The micro-batch study end to end on a small synthetic Fashion-MNIST-layout dataset."""
import json

from tests.data_fixtures import make_fashion_mnist
from wszoo.cli import main
from wszoo.training.study import format_table, microbatch_study


def test_study_runs_and_reports(tmp_path, capsys):
    root = make_fashion_mnist(tmp_path / "fm", n_train=48, n_test=40)
    out = tmp_path / "study"
    assert main(["study", "microbatch", "--data-dir", str(root), "--batch-sizes", "1", "8",
                 "--norms", "bn", "gn_ws", "bcn_ws",
                 "--epochs", "1", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| norm | batch 1 | batch 8 |" in printed and "| gn_ws |" in printed and "| bn |" in printed
    assert "| bcn_ws |" in printed
    study = json.loads((out / "microbatch.json").read_text())
    assert study["settings"]["train_images"] == 48
    run = study["runs"]["gn_ws"]["1"]
    assert run["steps"] == 48 and len(run["curve"]) >= 10  # batch 1: one step per image, equal images seen
    assert study["runs"]["gn_ws"]["8"]["steps"] == 6
    assert (out / "microbatch_loss.png").stat().st_size > 10_000
    assert (out / "microbatch.md").read_text().strip() == format_table(
        {"settings": study["settings"],
         "runs": {k: {int(b): r for b, r in v.items()} for k, v in study["runs"].items()}})


def test_study_rejects_unknown_norms(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="unknown norms"):
        microbatch_study(data_dir=str(tmp_path), norms=["ln"])
