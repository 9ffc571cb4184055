"""wszoo bench: the report's structure and its CLI (no timing assertions: timings are the bench's output)."""
import json
import math

from wszoo.cli import main
from wszoo.tools.bench import benchmark_model, format_report, run_benchmarks

TINY = dict(img_size=16, eval_batch=2, train_batch=2, accum_steps=2, repeats=1, eval_repeats=1, warmup=0)


def test_report_has_every_ratio_positive_and_finite():
    result = benchmark_model("nf_resnet26", **TINY)
    expected = {"eval_b1_ws_vs_folded", "eval_b2_ws_vs_folded", "eval_b1_timm_vs_folded", "eval_b2_timm_vs_folded",
                "train_b2_ws_vs_plain", "train_b2_channels_last_ws_vs_plain",
                "train_b2_ws_channels_last_vs_contiguous", "accum2x1_ws_vs_plain", "accum2x1_ws_accumulate_vs_plain",
                "eval_b1_ort_vs_folded", "eval_b2_ort_vs_folded",  # ONNX Runtime: in the test extra
                "train_b2_grouped_vs_plain", "train_b2_grouped_vs_per_layer", "standardize_grouped_vs_per_layer",
                "train_b2_frozen_backbone_ws_vs_folded", "optimizer_step_agc_vs_none",
                "optimizer_step_separate_agc_vs_none"}
    assert set(result["ratios"]) == expected
    assert all(math.isfinite(v) and v > 0 for v in result["ratios"].values())
    memory = result["memory"]
    assert memory["train_saved_for_backward_mb_ws"] > memory["train_saved_for_backward_mb_plain"] > 0, \
        "WS saves the standardized weights for backward as well"
    assert 0 < memory["eval_cache_mb"] <= memory["params_mb"]
    assert result["ws_layers"] > 0 and result["standardize_fwd_bwd_ms"] > 0
    # counted by the torch profiler (not timed): grouping removes most of what WS dispatches per step
    dispatches = result["train"]["extra_dispatches"]
    assert 0 < dispatches["grouped"] < dispatches["per_layer"] / 2, dispatches
    # AGC all at once against timm's parameter-by-parameter loop
    agc = result["agc"]["dispatches"]
    assert agc["parameters"] > 50 and 0 < agc["agc"] < agc["timm_agc"] / 4, agc


def test_models_without_a_timm_twin_and_the_table():
    report = run_benchmarks(["resnet_mini_gn_ws"], tune_allocator=False, channels_last=False, **TINY)
    result = report["results"][0]
    assert not any("timm" in k for k in result["ratios"]) and "train_b2_ws_vs_plain" in result["ratios"]
    table = format_report(report)
    assert "| train_b2_ws_vs_plain |" in table and "resnet_mini_gn_ws" in table
    assert "| extra aten dispatches / training step, grouped (per layer) |" in table
    assert "| aten dispatches of one AGC call, ours (timm's) |" in table
    assert report["machine"]["allocator_tuned"] is False


def test_cli_writes_json_and_rejects_bad_input(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "resnet_mini_gn_ws", "--img-size", "16", "--eval-batch", "2", "--train-batch", "2",
                 "--accum-steps", "2", "--repeats", "1", "--eval-repeats", "1", "--warmup", "0",
                 "--no-tune-allocator", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["results"][0]["model"] == "resnet_mini_gn_ws"
    assert "accum2x1_ws_accumulate_vs_plain" in capsys.readouterr().out
    assert main(["bench", "resnet_mini_gn_ws", "--repeats", "0"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err
    assert main(["bench", "no_such_model"]) == 2
    assert "no_such_model" in capsys.readouterr().err
