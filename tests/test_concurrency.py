"""One writer per output folder, every time: processes started together on one --out race
through a barrier (a file they wait for), and exactly one proceeds; the other is refused
with one line naming the first's PID, exit 2, before it does any work."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bench_helpers import ENV, setup_files

from ditloc._io import LOCK_FILE

ROUNDS = 20

#: one racer: waits for the barrier file `go`, takes the lock of a folder and, holding it, waits to
#: be released (the file `release`) or killed. It imports `ditloc._io` without the package's heavy
#: imports (torch, diffusers), so that 2 x 20 processes start in seconds.
RACER = """
import os, sys, time, types
from pathlib import Path

package = types.ModuleType("ditloc")
package.__path__ = [sys.argv[1]]
sys.modules["ditloc"] = package
from ditloc._io import OutputLock, write_atomic
from ditloc.errors import DitlocError

sync, out, me = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]


def wait(name):
    while not (sync / name).exists():
        time.sleep(0.0005)


write_atomic(sync / f"ready.{me}", "")
wait("go")
lock = OutputLock(out)
try:
    lock.__enter__()
except DitlocError as e:
    write_atomic(sync / f"result.{me}", f"refused {e}")
    sys.exit(0)
write_atomic(sync / f"result.{me}", f"held {os.getpid()}")
wait("release")
lock.__exit__(None, None, None)
"""


def _wait_for(paths, procs, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        for proc in procs:
            assert proc.poll() in (None, 0), proc.communicate()[1]
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {[p.name for p in paths]}"
        time.sleep(0.001)


def test_two_processes_racing_for_one_folder_twenty_times(tmp_path):
    """Two processes try at the same instant, 20 times on one folder: one holds it, the other names
    that holder's PID in one line. Every other holder is killed (SIGKILL) instead of releasing: its
    dead PID stays in the lock file and the next pair must neither be blocked nor name it."""
    import ditloc

    source, out = str(Path(ditloc.__file__).parent), tmp_path / "out"
    for i in range(ROUNDS):
        sync = tmp_path / f"sync{i}"
        sync.mkdir()
        procs = {me: subprocess.Popen([sys.executable, "-c", RACER, source, str(sync), str(out), me], env=ENV,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for me in "ab"}
        try:
            _wait_for([sync / "ready.a", sync / "ready.b"], procs.values())
            (sync / "go").touch()
            _wait_for([sync / "result.a", sync / "result.b"], procs.values())
            said = {me: (sync / f"result.{me}").read_text() for me in "ab"}
            held = [me for me in "ab" if said[me].startswith("held ")]
            assert len(held) == 1, said  # exactly one proceeds
            winner, loser = held[0], "b" if held[0] == "a" else "a"
            pid = procs[winner].pid
            assert said[winner] == f"held {pid}"
            assert said[loser].startswith("refused ") and "\n" not in said[loser], said
            assert f"another ditloc process (PID {pid})" in said[loser], said
            assert (out / LOCK_FILE).read_text() == f"{pid}\n"
            assert procs[loser].wait(timeout=60) == 0
            if i % 2:
                procs[winner].kill()  # a killed holder: its PID stays, its lock goes with it
                procs[winner].wait()
                assert (out / LOCK_FILE).read_text() == f"{pid}\n"
            else:
                (sync / "release").touch()
                assert procs[winner].wait(timeout=60) == 0, procs[winner].stderr.read()
                assert (out / LOCK_FILE).read_text() == ""  # released: it names nobody
        finally:
            for proc in procs.values():
                proc.kill()
                proc.wait()


COMMANDS = ("bench", "localize", "unlearn")

#: one of two processes that start each command at the barrier go.<command> (the model loading
#: spied on: did this process hold the lock of --out when the model began to load?)
CLI = """
import contextlib, fcntl, io, json, os, sys, time
from pathlib import Path
from ditloc import cli
from ditloc._io import write_atomic

sync, me, commands = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
load = cli.models.load_pipeline
current = {}


def held() -> bool:
    try:
        f = open(current["lock"])
    except FileNotFoundError:
        return False
    with f:  # another open file: refused while anyone holds the lock
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except OSError:
            return f.read().strip() == str(os.getpid())


def spy(*args, **kwargs):
    write_atomic(sync / f"loaded.{current['name']}.{me}", json.dumps(held()))
    return load(*args, **kwargs)


cli.models.load_pipeline = spy
write_atomic(sync / f"ready.{me}", "")
for name, lock, argv in commands:
    current.update(name=name, lock=lock)
    while not (sync / f"go.{name}").exists():
        time.sleep(0.0005)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
    write_atomic(sync / f"result.{name}.{me}", json.dumps({"code": code, "stderr": err.getvalue()}))
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return setup_files(tmp_path_factory)


def _argv(command, model, probes, out):
    if command == "bench":
        return ["bench", str(model), "--probes", str(probes), "--categories", "color", "--concepts-per-category", "1",
                "--localization-prompts", "1", "--evaluation-prompts", "1", "--k", "1", "--seeds", "0",
                "--evaluator", "toy", "--steps", "2", "--out", str(out)]
    if command == "localize":
        return ["localize", str(model), "--concept", "red", "--prompt", "a red car", "--localize-method", "search",
                "--max-k", "1", "--steps", "2", "--out", str(out)]
    return ["unlearn", str(model), "--concept", "dog", "--anchor", "cat", "--prompt", "a dog on the beach",
            "--edit-method", "closed-form", "--blocks", "block.1", "--steps", "2", "--out", str(out)]


def test_two_commands_started_together_on_one_out(files, tmp_path):
    """The real command line, started twice at once on one --out, for each command: one runs to the
    end, having taken the lock before its model loaded; the other is refused in one line naming it,
    and loads nothing."""
    model, probes = files
    sync = tmp_path / "sync"
    sync.mkdir()
    commands = []
    for name in COMMANDS:
        out = tmp_path / name
        lock = out / (f"{LOCK_FILE}.rank0" if name == "bench" else LOCK_FILE)
        commands.append((name, str(lock), _argv(name, model, probes, out)))
    procs = {me: subprocess.Popen([sys.executable, "-c", CLI, str(sync), me, json.dumps(commands)], cwd=tmp_path,
                                  env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for me in "ab"}
    try:
        _wait_for([sync / "ready.a", sync / "ready.b"], procs.values(), timeout=300)
        for name, lock, _ in commands:
            (sync / f"go.{name}").touch()
            _wait_for([sync / f"result.{name}.a", sync / f"result.{name}.b"], procs.values(), timeout=300)
            said = {me: json.loads((sync / f"result.{name}.{me}").read_text()) for me in "ab"}
            codes = {me: said[me]["code"] for me in "ab"}
            assert sorted(codes.values()) == [0, 2], said
            winner = next(me for me in "ab" if codes[me] == 0)
            loser = "b" if winner == "a" else "a"
            lines = [line for line in said[loser]["stderr"].splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("ditloc: error: "), said[loser]
            assert f"another ditloc process (PID {procs[winner].pid})" in lines[0], (name, lines)
            assert json.loads((sync / f"loaded.{name}.{winner}").read_text()) is True  # the lock, then the model
            assert not (sync / f"loaded.{name}.{loser}").exists()  # refused before any work
            assert Path(lock).read_text() == ""  # released at the end
            written = {"bench": "results.jsonl", "localize": "localization.json", "unlearn": "ditloc_edit.json"}
            assert (Path(lock).parent / written[name]).is_file()
        for proc in procs.values():
            assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_a_failed_start_leaves_no_folder_and_a_killed_holder_blocks_nobody(files, tmp_path):
    """A command that fails after taking the lock but before writing removes the folder it made; one
    killed with SIGKILL while it holds the lock leaves it to the next run (the kernel releases it)."""
    from bench_helpers import run_cli

    model, probes = files
    out = tmp_path / "out"
    code, _, err = run_cli(["localize", str(model), "--concept", "red", "--prompt", "a red car", "--k", "99",
                            "--out", str(out)])  # refused inside the command (the model's blocks), after the lock
    assert code == 2 and "--k must be between 1 and" in err
    assert not out.exists()
    hold = ("import sys, time; from ditloc._io import OutputLock; held = OutputLock(sys.argv[1]).__enter__(); "
            "print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_cli(_argv("unlearn", model, probes, out))
        assert code == 2 and f"(PID {holder.pid})" in err
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run_cli(_argv("unlearn", model, probes, out))
    assert code == 0, err
