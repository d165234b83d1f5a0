"""The command line (``pytorch_mixtures.app.cli``): its checks and the installed script."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest

from pytorch_mixtures.app import cli
from pytorch_mixtures.app.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_console_script_is_the_app_cli_main():
    (script,) = entry_points(group="console_scripts", name="pytorch-mixtures")
    assert script.value == "pytorch_mixtures.app.cli:main"
    assert script.load() is cli.main


def test_out_must_be_a_folder(tmp_path: Path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for command in (["train", "--model", "dense"], ["demo"]):
        with pytest.raises(SystemExit, match="--out: expected a folder"):
            main([*command, "--out", str(a_file), "--steps", "1"])
    with pytest.raises(SystemExit, match="expected a checkpoint"):
        main(["train", "--model", "dense", "--out", str(tmp_path / "none"), "--resume"])
