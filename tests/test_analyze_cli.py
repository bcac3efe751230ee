"""`modadapt analyze`: the report, its round trip into `convert`, and clear errors that leave no
report directory behind."""

import json
import re

import pytest

import modadapt
from modadapt.cli import main

TEXT = (
    "The quick brown fox jumps over the lazy dog. Layers that attend alike can be skipped.\n\n"
    "Mixture-of-Depths routes tokens around chosen layers, keeping the residual stream intact.\n"
) * 20


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("analyze")
    data = base / "calib.txt"
    data.write_text(TEXT)
    out = base / "report"
    code = main(
        [
            "analyze",
            "tiny-llama",
            "--data",
            str(data),
            "--samples",
            "6",
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--select",
            "count=2",
            "--capacity",
            "0.25",
            "--quiet",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    return out


def test_report_contents(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    assert report["num_layers"] == 4 and report["metric"] == "arank" and report["samples"] == 6
    assert set(report["versions"]) >= {"modadapt", "torch", "transformers"}
    assert report["data"]["path"].endswith("calib.txt") and len(report["data"]["sha256"]) == 64
    assert report["rule"] == {"name": "count", "value": 2}
    selected = report["selected_layers"]
    assert len(selected) == 2 and 0 not in selected
    assert [r["layer"] for r in report["layers"] if r["selected"]] == selected
    for r in report["layers"]:
        assert r["samples"] == 6 and 0 < r["mean"] <= 32
        assert (r["flops_mod"] < r["flops_dense"]) == r["selected"]
    assert f"-c {report_dir}/convert.yaml" in report["convert_command"]
    assert report["convert_command"] in (report_dir / "report.md").read_text()
    assert sorted(p.name for p in report_dir.iterdir()) == [
        "convert.yaml",
        "flops.png",
        "metric.png",
        "report.html",
        "report.json",
        "report.md",
    ]
    assert not [p for p in report_dir.parent.iterdir() if p.name.startswith(".report")]  # no temp left


def test_html_is_self_contained(report_dir):
    page = (report_dir / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "Selected layers" in page


def test_report_round_trips_into_convert(report_dir, tmp_path, capsys):
    selected = json.loads((report_dir / "report.json").read_text())["selected_layers"]
    for flags in (["-c", str(report_dir / "convert.yaml")], ["--layers", f"from:{report_dir}", "--router", "topk"]):
        out = tmp_path / flags[0].strip("-")
        code, stdout, err = run(capsys, "convert", "tiny-llama", *flags, "-o", str(out))
        assert code == 0, err
        meta = json.loads((out / "modadapt.json").read_text())
        assert meta["mod_config"]["layers"] == selected
    from_yaml = json.loads((tmp_path / "c" / "modadapt.json").read_text())["mod_config"]
    assert from_yaml["capacity"] == 0.25 and from_yaml["router"] == "topk"
    model = modadapt.build_preset("tiny-llama")
    modadapt.convert(model, router="topk", layers=f"from:{report_dir}")
    assert [layer.mod_state.index for layer in modadapt.mod_layers(model)] == selected


def test_from_report_errors(report_dir, tmp_path, capsys):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "report.json").write_text("{not json")
    other = tmp_path / "other"
    other.mkdir()
    report = json.loads((report_dir / "report.json").read_text())
    (other / "report.json").write_text(json.dumps({**report, "num_layers": 6}))
    cases = [(tmp_path / "missing", "does not exist"), (corrupt, "corrupt"), (other, "6 layers")]
    for directory, message in cases:
        out = tmp_path / "out"
        code, _, err = run(
            capsys, "convert", "tiny-llama", "--router", "topk", "--layers", f"from:{directory}", "-o", str(out)
        )
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
        assert not out.exists()


def test_cosine_metric_and_builtin_text(tmp_path, capsys):
    out = tmp_path / "cos"
    code, stdout, err = run(
        capsys,
        "analyze",
        "tiny-gpt2",
        "--metric",
        "cosine",
        "--samples",
        "3",
        "--seq-len",
        "16",
        "--select",
        "threshold=-1",
        "--quiet",
        "-o",
        str(out),
    )
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["path"] == "builtin:default" and report["metric"] == "cosine"
    assert report["selected_layers"] == [1, 2, 3]  # every cosine is above -1; never layer 0
    assert all(-1 <= r["mean"] <= 1 for r in report["layers"])
    assert "selected layers [1, 2, 3]" in stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "MISSING"], "does not exist"),
        (["--samples", "0"], "--samples"),
        (["--select", "fraction=2"], "fraction"),
        (["--select", "best"], "--select"),
        (["--seq-len", "100000"], "fewer than --seq-len"),
        (["--seq-len", "600"], "longer than the model's max_position_embeddings 512"),
        (["--capacity", "1.5"], "capacity"),
    ],
)
def test_bad_input_is_a_one_line_error_without_output(tmp_path, capsys, argv, message):
    out = tmp_path / "report"
    argv = [a.replace("MISSING", str(tmp_path / "nope.txt")) for a in argv]
    code, _, err = run(
        capsys, "analyze", "tiny-llama", "--samples", "2", "--seq-len", "16", "--quiet", *argv, "-o", str(out)
    )
    assert code == 2
    assert err.startswith("modadapt: error:") and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_short_text_and_tied_scores_are_reported(tmp_path, capsys):
    """300 bytes cannot make 32 distinct windows of 128 tokens, and full-rank attention gives every
    layer ARank 127: both are said, in the report and on stderr, not passed off as a measurement."""
    data = tmp_path / "short.txt"
    data.write_text("hello world, this is a small text. " * 9)
    out = tmp_path / "report"
    code, _, err = run(capsys, "analyze", "tiny-llama", "--data", str(data), "--quiet", "-o", str(out))
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["text_tokens"] == len(data.read_bytes()) and "fewer than --samples 32 x --seq-len 128" in err
    assert "overlapping, from a text of 315 tokens" in (out / "report.md").read_text()
    assert {r["mean"] for r in report["layers"]} == {127.0}
    assert "layers [1, 2, 3] all score 127.0000" in report["tie"] and report["tie"] in err
    assert report["tie"] in (out / "report.md").read_text()


def test_existing_report_directory_is_not_overwritten(report_dir, capsys):
    before = (report_dir / "report.json").read_text()
    code, _, err = run(
        capsys, "analyze", "tiny-llama", "--samples", "2", "--seq-len", "16", "--quiet", "-o", str(report_dir)
    )
    assert code == 2 and "--overwrite" in err
    assert (report_dir / "report.json").read_text() == before


def _image_folder(root, count=5, size=(20, 24)):
    import numpy as np
    from PIL import Image

    (root / "cls").mkdir(parents=True)
    generator = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray((generator.random((*size, 3)) * 255).astype("uint8")).save(root / "cls" / f"{i}.png")
    (root / "cls" / "notes.txt").write_text("not an image")  # ignored


def test_vit_analysis_reads_an_image_folder(tmp_path, capsys):
    images = tmp_path / "images"
    _image_folder(images)
    out = tmp_path / "report"
    assert (
        main(
            [
                "analyze",
                "tiny-vit",
                "--data",
                str(images),
                "--samples",
                "4",
                "--batch-size",
                "2",
                "-o",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["kind"] == "images" and report["data"]["samples"] == 4
    assert report["data"]["seq_len"] == 65  # 64 patches + the class token of tiny-vit
    assert len(report["layers"]) == 4 and 0 not in report["selected_layers"]
    capsys.readouterr()
    assert main(["convert", "tiny-vit", "-c", str(out / "convert.yaml"), "-o", str(tmp_path / "mod")]) == 0
    assert (
        json.loads((tmp_path / "mod" / "modadapt.json").read_text())["mod_config"]["layers"]
        == report["selected_layers"]
    )


@pytest.mark.parametrize("kind", ["missing", "empty", "corrupt"])
def test_vit_analysis_bad_image_data(tmp_path, capsys, kind):
    images = tmp_path / "images"
    if kind != "missing":
        images.mkdir()
    if kind == "corrupt":
        (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "report"
    assert main(["analyze", "tiny-vit", "--data", str(images), "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("modadapt: error: ") and err.count("\n") == 1
    assert {"missing": "does not exist", "empty": "holds no image files", "corrupt": "not a readable image"}[
        kind
    ] in err
    assert not out.exists()


def test_llava_analysis_reads_llava_json(tmp_path, capsys):
    _image_folder(tmp_path, count=3, size=(32, 32))
    records = [
        {
            "id": str(i),
            "image": f"cls/{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat digit is this?"},
                {"from": "gpt", "value": str(i)},
            ],
        }
        for i in range(3)
    ]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "report"
    assert main(["analyze", "tiny-llava", "--data", str(data), "--samples", "3", "-o", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["kind"] == "llava" and report["data"]["samples"] == 3
    assert 0 not in report["selected_layers"] and len(report["layers"]) == 4
    capsys.readouterr()
    assert main(["convert", "tiny-llava", "--layers", f"from:{out}", "-o", str(tmp_path / "mod")]) == 0

    records[1]["conversations"][0]["value"] = "What digit is this?"  # no <image>: the record is named
    data.write_text(json.dumps(records))
    assert main(["analyze", "tiny-llava", "--data", str(data), "-o", str(tmp_path / "r2"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "record 1" in err and "<image>" in err and not (tmp_path / "r2").exists()
