"""The command line (``pytorch_mixtures.app.cli``): its checks and the installed script."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytorch_mixtures.app import bench, cli
from pytorch_mixtures.app.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

_EXTRA = 'pip install "pytorch-mixtures[cli]"'


def test_console_script_is_the_app_cli_main():
    (script,) = entry_points(group="console_scripts", name="pytorch-mixtures")
    assert script.value == "pytorch_mixtures.app.cli:main"
    assert script.load() is cli.main


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The single line a rejected command wrote on stderr."""
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("pytorch-mixtures") and "error" in lines[0]
    return lines[0]


@pytest.fixture
def no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command gets as far as training or benchmarking."""

    def ran(*args: object, **kwargs: object) -> None:
        raise AssertionError("a bad command line got as far as running")

    monkeypatch.setattr(cli, "train", ran)
    monkeypatch.setattr(cli, "run_demo", ran)
    monkeypatch.setattr(bench, "run_bench", ran)


TRAIN = ["train", "--model", "dense", "--no-progress"]
DEMO = ["demo", "--no-progress"]
BENCH = ["bench", "--no-memory"]

# (command line, the flag the error must name, the bad value it must show)
BAD_COMMAND_LINES = [
    ([*TRAIN, "--steps", "-1"], "--steps", "-1"),
    ([*DEMO, "--steps", "0"], "--steps", "0"),
    ([*TRAIN, "--steps", "abc"], "--steps", "abc"),
    ([*TRAIN, "--checkpoint-every", "-1"], "--checkpoint-every", "-1"),
    ([*TRAIN, "--stop-at", "-1"], "--stop-at", "-1"),
    ([*TRAIN, "--model", "foo"], "--model", "foo"),
    ([*DEMO, "--lr", "nan"], "--lr", "nan"),
    ([*DEMO, "--lr", "-1"], "--lr", "-1"),
    ([*TRAIN, "--lr", "inf"], "--lr", "inf"),
    ([*DEMO, "--batch-size", "0"], "--batch-size", "0"),
    ([*TRAIN, "--seq-len", "0"], "--seq-len", "0"),
    ([*DEMO, "--eval-every", "0"], "--eval-every", "0"),
    ([*DEMO, "--eval-batches", "0"], "--eval-batches", "0"),
    ([*DEMO, "--warmup-steps", "-1"], "--warmup-steps", "-1"),
    ([*DEMO, "--models", ","], "--models", "','"),
    ([*DEMO, "--models", "dense,foo"], "--models", "foo"),
    ([*DEMO, "--models", "moe,moe"], "--models", "moe,moe"),
    ([*DEMO, "--max-bytes", "-1"], "--max-bytes", "-1"),
    ([*DEMO, "--max-bytes", "10"], "--max-bytes", "10"),  # the stdlib corpus cut too short
    ([*DEMO, "--seed", "-1"], "--seed", "-1"),
    ([*DEMO, "--sample-tokens", "-1"], "--sample-tokens", "-1"),
    ([*DEMO, "--mod-capacity", "0"], "--mod-capacity", "0"),
    ([*DEMO, "--mod-capacity", "1.5"], "--mod-capacity", "1.5"),
    ([*TRAIN, "--num-experts", "0"], "--num-experts", "0"),
    ([*DEMO, "--num-layers", "0"], "--num-layers", "0"),
    ([*TRAIN, "--dim", "0"], "--dim", "0"),
    ([*DEMO, "--num-experts", "4", "--top-k", "5"], "--top-k", "5"),
    ([*TRAIN, "--dim", "30", "--num-heads", "4"], "--num-heads", "--dim=30"),
    ([*DEMO, "--models", "moe", "--ffn-hidden", "1"], "--ffn-hidden", "1"),
    ([*DEMO, "--balance-coef", "nan"], "--balance-coef", "nan"),
    ([*DEMO, "--routed-scaling-factor", "-2"], "--routed-scaling-factor", "-2"),
    ([*BENCH, "--only", "nonexistent"], "--only", "nonexistent"),
    ([*BENCH, "--repeats", "0"], "--repeats", "0"),
    ([*BENCH, "--threads", "0"], "--threads", "0"),
    ([*BENCH, "--device", "tpu"], "--device", "tpu"),
    ([*BENCH, "--json", "missing-folder/out.json"], "--json", "missing-folder"),
]


@pytest.mark.usefixtures("no_run")
@pytest.mark.parametrize(
    ("argv", "flag", "value"), BAD_COMMAND_LINES, ids=[" ".join(a) for a, _, _ in BAD_COMMAND_LINES]
)
def test_a_bad_value_is_one_line_and_exit_2_before_running(
    argv: list[str], flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "out"
    checks_the_corpus = argv[-2:] == ["--max-bytes", "10"]  # found after --out is made
    command = argv if argv[0] == "bench" else [*argv, "--out", str(out)]
    with pytest.raises(SystemExit) as excinfo:
        main(command)
    assert excinfo.value.code == 2
    line = _one_error_line(capsys)
    assert f"error: {flag}: " in line
    assert value in line
    assert checks_the_corpus or not out.exists()  # refused before anything was made


@pytest.mark.usefixtures("no_run")
def test_bench_only_names_the_valid_candidates(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as excinfo:
        main([*BENCH, "--only", "moe[auto]", "nonexistent"])
    assert excinfo.value.code == 2
    line = _one_error_line(capsys)
    for name in ("dense-equivalent", "moe[auto]", "moe[loop]", "naive masked loop"):
        assert repr(name) in line


def test_out_must_be_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for command in (["train", "--model", "dense"], ["demo"]):
        with pytest.raises(SystemExit, match="--out: expected a folder") as excinfo:
            main([*command, "--out", str(a_file), "--steps", "1"])
        assert excinfo.value.code == 2
        assert "--out: expected a folder" in _one_error_line(capsys)
    with pytest.raises(SystemExit, match="expected a checkpoint") as excinfo:
        main(["train", "--model", "dense", "--out", str(tmp_path / "none"), "--resume"])
    assert excinfo.value.code == 2  # a resume problem, found by the run: also one line, 2
    assert "expected a checkpoint" in _one_error_line(capsys)


@pytest.mark.usefixtures("no_run")
@pytest.mark.parametrize(
    ("module", "command"),
    [
        ("tqdm", ["demo"]),
        ("matplotlib", ["demo", "--no-progress"]),
        ("tqdm", ["train", "--model", "dense"]),
        ("safetensors", ["train", "--model", "dense", "--no-progress"]),
    ],
)
def test_a_missing_cli_extra_says_what_to_install(
    module: str,
    command: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails
    with pytest.raises(SystemExit) as excinfo:
        main([*command, "--out", str(tmp_path / "out")])
    assert excinfo.value.code == 2
    line = _one_error_line(capsys)
    assert module in line and _EXTRA in line
    assert not (tmp_path / "out").exists()


def test_an_extra_missing_where_unforeseen_is_one_line_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    def fails(*args: object, **kwargs: object) -> None:
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib.figure")

    monkeypatch.setattr(cli, "run_demo", fails)
    monkeypatch.setattr(cli, "load_corpus", lambda *args, **kwargs: SimpleNamespace(source="-"))
    with pytest.raises(SystemExit) as excinfo:
        main(["demo", "--no-progress", "--out", str(tmp_path / "out")])
    assert excinfo.value.code == 2
    assert _EXTRA in _one_error_line(capsys)

    def other(*args: object, **kwargs: object) -> None:
        raise ModuleNotFoundError("No module named 'not_an_extra'", name="not_an_extra")

    monkeypatch.setattr(cli, "run_demo", other)  # a bug, not a missing extra: not hidden
    with pytest.raises(ModuleNotFoundError):
        main(["demo", "--no-progress", "--out", str(tmp_path / "out")])
