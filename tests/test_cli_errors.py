"""Issue 13: ``edgead`` errors are one line naming the file and the fix (the traceback only with
--debug), bad numbers are usage errors, and ``edgead train --out`` never trains over a run."""

from __future__ import annotations

import pytest

from edgead.cli import main


def one_error_line(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


def test_unknown_detector_is_one_line_listing_the_choices(tmp_path, capsys):
    pytest.importorskip("torch")
    rc = main(["train", "--data", str(tmp_path), "--category", "washer", "--model", "bogus", "--out", str(tmp_path / "r")])
    line = one_error_line(capsys.readouterr().err, "edgead train")
    assert rc == 2 and "bogus" in line and "ssim_ae" in line
    assert not (tmp_path / "r").exists()


def test_missing_data_names_the_folder_and_debug_adds_the_traceback(tmp_path, capsys):
    pytest.importorskip("torch")
    args = ["train", "--data", str(tmp_path / "nowhere"), "--category", "washer", "--model", "ssim_ae",
            "--out", str(tmp_path / "r")]
    assert main(args) == 3
    assert "nowhere" in one_error_line(capsys.readouterr().err, "edgead train")
    assert main(args + ["--debug"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("edgead train: error:")


def test_eval_of_a_non_run_is_one_line(tmp_path, capsys):
    pytest.importorskip("torch")
    assert main(["eval", str(tmp_path), "--data", str(tmp_path), "--category", "x"]) == 4
    assert "not a training run" in one_error_line(capsys.readouterr().err, "edgead eval")


@pytest.mark.parametrize("argv", [["synth", "--image-size", "0"], ["synth", "--n-train", "-3"],
                                  ["train", "--data", "d", "--category", "c", "--out", "o", "--epochs", "0"],
                                  ["train", "--data", "d", "--category", "c", "--out", "o", "--val-fraction", "1.5"]])
def test_bad_numbers_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and "usage:" in capsys.readouterr().err


def test_train_refuses_an_existing_run(tmp_path, capsys):
    pytest.importorskip("torch")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"detector": "ssim_ae"}')
    (run / "model.safetensors").write_bytes(b"weights of the earlier run")
    args = ["train", "--data", str(tmp_path / "nowhere"), "--category", "washer", "--model", "ssim_ae",
            "--out", str(run)]
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err, "edgead train")
    assert "--resume" in line and "--overwrite" in line
    assert (run / "model.safetensors").read_bytes() == b"weights of the earlier run"
    assert main(args + ["--resume", "--overwrite"]) == 2
    capsys.readouterr()
    assert main(args + ["--resume"]) == 3  # past the check: it goes on to the (missing) data


def test_prepare_run_dir_overwrite_removes_only_run_files(tmp_path):
    pytest.importorskip("torch")
    from edgead.training.run_dir import RUN_FILES, RunExistsError, prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    for name in RUN_FILES + ("notes.txt",):
        (run / name).write_text("old")
    prepare_run_dir(run, overwrite=True)
    assert [p.name for p in run.iterdir()] == ["notes.txt"]
    with pytest.raises(RunExistsError, match="no run to resume"):
        prepare_run_dir(run, resume=True)
    prepare_run_dir(tmp_path / "new")  # a new folder is fine
