"""`tokenprune eval` refuses random weights unless --allow-random, and then marks the output and the
plot title; a head whose classes do not match the data is warned about; WER rows report the WER
and its change in points, never a "retained" figure."""
import json

import pytest
from PIL import Image

from tokenprune.cli import main
from tokenprune.evaluate import format_row

from test_cli import TINY_ARGS, _eval_args, tiny  # noqa: F401  (tiny: fixture)


def _random_args(tiny, out, *extra):  # noqa: F811
    # a timm name: random weights and timm's default 1000-class head, on 3-class data
    args = _eval_args(tiny, out, *extra, methods="merge", budgets="0.5")
    i = args.index("--model")
    args[i + 1] = "vit_small_patch16_224"
    return args + ["--model-args", json.dumps(TINY_ARGS)]


def test_random_weights_are_refused_before_loading(tiny, tmp_path, capsys):  # noqa: F811
    assert main(_random_args(tiny, tmp_path)) == 2
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert len(err.splitlines()) == 1 and "RANDOM weights" in err and "--allow-random" in err, err
    assert not (tmp_path / "eval_top1.json").exists()


def test_allow_random_marks_output_json_and_plot_title(tiny, tmp_path, capsys):  # noqa: F811
    assert main(_random_args(tiny, tmp_path, "--allow-random")) == 0
    cap = capsys.readouterr()
    warnings = [line for line in cap.err.splitlines() if line.startswith("WARNING")]
    assert any("RANDOM" in w for w in warnings), cap.err
    assert any("1000 classes" in w and "3" in w for w in warnings), cap.err
    res = json.loads((tmp_path / "eval_top1.json").read_text())
    assert res["random_weights"] is True
    assert "RANDOM WEIGHTS" in res["warnings"] and "HEAD HAS 1000 CLASSES, DATA 3" in res["warnings"]
    title = Image.open(tmp_path / "eval_top1.png").info.get("Title", "")
    assert "RANDOM WEIGHTS" in title and "HEAD HAS 1000 CLASSES" in title, title


def test_real_weights_have_no_warning(tiny, tmp_path, capsys):  # noqa: F811
    assert main(_eval_args(tiny, tmp_path, methods="cls", budgets="0.5")) == 0
    cap = capsys.readouterr()
    assert "WARNING" not in cap.err
    res = json.loads((tmp_path / "eval_top1.json").read_text())
    assert res["warnings"] == [] and res["random_weights"] is False
    assert "RANDOM" not in Image.open(tmp_path / "eval_top1.png").info.get("Title", "")


@pytest.mark.parametrize("wer, ref", [(3.5, 1.08), (0.09, 0.082), (0.5, 0.5)])
def test_wer_rows_report_points_not_retained(wer, ref):
    row = {"config": "merge@0.5", "method": "merge", "flop_ratio": 0.7, "wer": wer, "wer_delta": wer - ref,
           "agreement": 0.5, "seconds": 1.0}
    text = format_row(row, "wer")
    assert "retained" not in text
    assert f"WER {wer:.2%}" in text and f"{100 * (wer - ref):+.2f} points" in text


@pytest.mark.slow
def test_wer_evaluation_has_no_retained_column(assets, tmp_path, capsys):
    """Whisper tiny.en on one utterance: WER and its change in points, no "retained" anywhere."""
    pytest.importorskip("transformers")
    pytest.importorskip("jiwer")
    whisper = assets / "whisper-tiny.en"
    if not (whisper / "config.json").exists():
        pytest.skip("whisper-tiny.en not in the assets")
    args = ["eval", "--model", str(whisper), "--task", "wer", "--data", str(assets / "speech-hifitts-6097"),
            "--limit", "1", "--methods", "merge", "--budgets", "0.5", "--batch-size", "1", "--out", str(tmp_path),
            "--no-progress", "--threads", "1"]
    assert main(args) == 0
    cap = capsys.readouterr()
    assert "retained" not in cap.out
    res = json.loads((tmp_path / "eval_wer.json").read_text())
    for r in res["rows"]:
        assert "retained" not in r
        if r["method"] is not None:
            ref = next(u for u in res["rows"] if u["method"] is None)
            assert r["wer_delta"] == pytest.approx(r["wer"] - ref["wer"])
            assert f"{100 * r['wer_delta']:+.2f} points" in cap.out


def test_eval_non_square_model_input(tiny, tmp_path):  # noqa: F811
    """A model built for a non-square input (img_size [h, w]) gets images resized to h x w, not h x h."""
    args = _random_args(tiny, tmp_path, "--allow-random")
    i = args.index("--model-args")
    args[i + 1] = json.dumps({**TINY_ARGS, "img_size": [32, 16]})
    assert main(args) == 0
    rows = {r["config"]: r for r in json.loads((tmp_path / "eval_top1.json").read_text())["rows"]}
    assert rows["unreduced"]["agreement"] == 1.0 and 0 < rows["merge@0.5"]["flop_ratio"] < 1


def test_bad_speedups_file_is_refused_before_evaluating(tiny, tmp_path, capsys):  # noqa: F811
    """--speedups that is not a bench JSON fails at once, not after the whole evaluation (whose results
    would then be lost: nothing written)."""
    other = tmp_path / "not_bench.json"
    other.write_text(json.dumps({"rows": [{"config": "unreduced", "top1": 0.5}]}))
    capsys.readouterr()
    assert main(_eval_args(tiny, tmp_path / "out", "--speedups", str(other), methods="merge", budgets="0.5")) == 2
    cap = capsys.readouterr()
    assert "holds no speed-up rows" in cap.err and "unreduced" not in cap.out, cap.out
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert main(_eval_args(tiny, tmp_path / "out", "--speedups", str(broken), methods="merge", budgets="0.5")) == 2
    cap = capsys.readouterr()
    assert len(cap.err.strip().splitlines()) == 1 and "unreduced" not in cap.out, cap.err


def test_eval_refuses_video_and_audio_encoders_with_one_line(tiny, tmp_path, capsys):  # noqa: F811
    """eval measures image models (top-1, kNN, consumer) and Whisper (WER): a video or audio encoder is refused
    before any data is read, in one line, not fed images (it failed on the missing train archive or the
    image-shaped input)."""
    pytest.importorskip("transformers")
    from test_cli import _hf_folder

    path, _ = _hf_folder(tmp_path, "vivit")
    args = _eval_args(tiny, tmp_path / "out", "--train-data", str(tiny["data"]), methods="merge", budgets="0.5")
    args[args.index("--model") + 1] = str(path)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tokenprune eval: error:") and "video" in err[-1] and "bench" in err[-1], err
    assert not any(line.startswith("reading") for line in err), err


def test_missing_default_data_names_the_assets_folder(tiny, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Without --data the default test data lives in the assets folder; when it is missing the one line says so
    (where the folder came from, and --data / --assets), not '--data X does not exist' for a flag not given."""
    monkeypatch.setenv("TOKENPRUNE_ASSETS", str(tmp_path / "no_assets"))
    args = _eval_args(tiny, tmp_path / "out", methods="merge", budgets="0.5")
    i = args.index("--data")
    del args[i:i + 2]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "$TOKENPRUNE_ASSETS" in err and "--data" in err and "--assets" in err, err
    assert "--data " + str(tmp_path) not in err, err
