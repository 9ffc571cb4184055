"""MODEL_CARD.md is generated from configs/ and must be up to date."""
from pathlib import Path

import pytest

import wszoo
from wszoo.tools.card import params_and_gmacs, render_model_card

CARD = Path(__file__).resolve().parents[1] / "MODEL_CARD.md"


@pytest.fixture(scope="module")
def rendered():
    return render_model_card()


def test_model_card_is_up_to_date(rendered):
    assert CARD.read_text() == rendered, "MODEL_CARD.md is stale: run `wszoo card -o MODEL_CARD.md`"


def test_card_has_a_row_per_tag(rendered):
    for name in wszoo.list_pretrained():
        assert f"| `{name}` |" in rendered


def test_gmacs_match_known_values():
    # ResNet-50 at 224: 4.1 GMACs (torchvision's and timm's published figure)
    params, gmacs = params_and_gmacs("resnet50_gn_ws", (3, 224, 224))
    assert params == 25_557_032 and gmacs == pytest.approx(4.09, abs=0.01)
