"""Progress bars (ditloc._progress): drawn on a terminal only, counting the pipeline's own steps."""

import io

import pytest

from ditloc import _progress
from ditloc.cli import main
from ditloc.testing import tiny_pixart_pipeline

CALL = {"num_inference_steps": 3, "output_type": "latent", "use_resolution_binning": False}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def pipe():
    return tiny_pixart_pipeline()


def test_steps_of_every_call_fill_one_bar_and_the_pipeline_is_restored(pipe, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "0")
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with _progress.bar(desc="x", unit="step") as bar, _progress.count_steps(pipe, bar, calls=2):
        pipe(prompt=["a red car"], **CALL)
        assert (bar.n, bar.total) == (3, 6)  # the total (calls x steps) is known from the first call: an ETA
        pipe(prompt=["a red car"], **CALL)
        assert bar.n == 6
    assert "progress_bar" not in vars(pipe)  # the class's own method again
    with pytest.raises(RuntimeError, match="mid-run"), _progress.bar() as bar, _progress.count_steps(pipe, bar):
        raise RuntimeError("mid-run")
    assert "progress_bar" not in vars(pipe)


def test_bars_only_on_a_terminal_unless_forced(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    for stream, drawn in ((io.StringIO(), False), (Terminal(), True)):
        monkeypatch.setattr("sys.stderr", stream)
        with _progress.bar(total=2, desc="x") as bar:
            bar.update(2)
        assert ("2/2" in stream.getvalue()) is drawn and _progress.showing() is drawn
    for value, drawn in (("0", True), ("1", False)):
        monkeypatch.setenv("TQDM_DISABLE", value)
        stream = Terminal() if not drawn else io.StringIO()  # forced either way
        monkeypatch.setattr("sys.stderr", stream)
        with _progress.bar(total=2, desc="x") as bar:
            bar.update(2)
        assert ("2/2" in stream.getvalue()) is drawn


def test_localize_bar_counts_steps_over_prompt_batches(tmp_path, capsys, monkeypatch):
    path = tmp_path / "pixart"
    tiny_pixart_pipeline().save_pretrained(path)
    capsys.readouterr()  # (saving draws its own bar)
    argv = ["localize", str(path), "--concept", "red", "--prompt", "a red car", "--prompt", "a red boat",
            "--localize-method", "contribution", "--batch-size", "1", "--steps", "2", "--out", str(tmp_path / "loc")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "localize: 2/2 prompts" in err and "%|" not in err  # not a terminal: plain lines, no bar
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert main(argv[:-1] + [str(tmp_path / "loc2")]) == 0
    frames = capsys.readouterr().err.replace("\r", "\n")
    assert "localize: 100%" in frames and "4/4" in frames  # 2 batches x 2 steps
    assert "2/2 prompts" in frames
