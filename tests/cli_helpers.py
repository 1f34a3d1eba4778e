"""Running `ditloc` in the test's own process: the exit code and what it printed."""

from ditloc.cli import main


def run_main(argv, capsys):
    """-> (exit code, stdout, stderr) of `ditloc ARGV`; a usage error's SystemExit is its code."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
