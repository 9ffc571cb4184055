"""The README's Python examples run as written, in order, in one namespace (as a reader would).

Blocks fenced as ```py need the Hugging Face Hub and are not run here; tests/test_hub.py covers the
same calls against a local Hub stand-in."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace = {}
    exec(compile("\n".join(blocks), "README.md", "exec"), namespace)
    # the values the README's comments promise
    assert namespace["logits"].shape == (1, 10)
    assert tuple(namespace["features"].shape) == (1, 2048, 7, 7)
    bit_cfg = namespace["bit"].pretrained_cfg
    assert (bit_cfg["input_size"], bit_cfg["crop_pct"]) == ((3, 448, 448), 1.0)
    assert namespace["wszoo"].list_models("resnet*")[:3] == ["resnet50_gn_ws", "resnet101_gn_ws", "resnet_mini_bcn_ws"]
    assert [namespace[k].shape[1] for k in ("c3", "c4", "c5")] == [512, 1024, 2048]
    assert len(namespace["maps"]) == 2 and namespace["final"].shape == (1, 960, 7, 7)
    report = namespace["report"]  # torchvision's ResNet-50 converted to GN+WS in two lines
    assert (len(report.converted), len(report.skipped), len(report.norms)) == (53, 1, 53)
    assert str(report).startswith("converted 53 layer(s) to WS, kept 1 plain, replaced 53 norm(s)")
