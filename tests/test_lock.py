"""The run lock: a second writer refuses at once naming the holder; a lock left by a killed process, a recycled pid
or a host whose heartbeat stopped is taken over; one from another host with a live heartbeat is honoured."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from lora_ft.errors import RunError
from lora_ft.lock import STALE_S, RunLock, _process_start, live_holder, read_holder

HOLDER = textwrap.dedent("""
    import sys
    from lora_ft.lock import RunLock

    lock = RunLock(sys.argv[1], "output_dir run").acquire()
    print("locked", flush=True)
    sys.stdin.read()  # held until the test closes stdin (or kills this process)
    lock.release()
""")


def _holder(lock_file, tmp_path) -> subprocess.Popen:
    """A second real process that takes the lock and holds it."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(lock_file)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"  # an event, not a sleep: the lock is held from here on
    return proc


def test_a_second_process_is_refused_at_once_naming_the_holder_until_it_ends(tmp_path):
    lock_file = tmp_path / "run" / ".lora_ft.lock"
    proc = _holder(lock_file, tmp_path)
    record = read_holder(lock_file)
    assert record["pid"] == proc.pid and record["host"] == socket.gethostname()
    t0 = time.perf_counter()
    with pytest.raises(RunError) as refused:
        RunLock(lock_file, "output_dir run").acquire()
    assert time.perf_counter() - t0 < 1.0  # at once: no waiting for the holder
    assert str(refused.value) == (f"output_dir run is in use by another lora_ft process: pid {proc.pid} on host "
                                  f"{record['host']}, started {record['started']} ({record['command']}); wait for it "
                                  "to finish or stop it, or choose another output_dir")
    proc.stdin.close()  # the holder releases: the file goes, and the next process gets the lock
    assert proc.wait(timeout=60) == 0
    assert not lock_file.exists()
    with RunLock(lock_file):
        assert read_holder(lock_file)["pid"] == os.getpid()
    assert not lock_file.parent.exists()  # created for the lock and still empty: removed with it


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    lock_file = tmp_path / "run" / ".lora_ft.lock"
    proc = _holder(lock_file, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert read_holder(lock_file)["pid"] == proc.pid  # the record stays behind; the kernel dropped the flock
    with RunLock(lock_file, "output_dir run"):
        assert read_holder(lock_file)["pid"] == os.getpid()
    assert f"taking over the lock left by pid {proc.pid} on host" in caplog.text


def _leave_record(lock_file, **record) -> None:
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock_file.write_text(json.dumps({"started": "2026-01-01T00:00:00+00:00", "command": "lora-ft train r.yaml",
                                     **record}))


def test_a_recycled_pid_does_not_keep_a_dead_lock(tmp_path, caplog):
    """The record names a pid that is alive (this very process) but no process holds the flock: the holder is gone
    and the pid was given to another process since. Nothing trusts the pid, so the lock is free."""
    lock_file = tmp_path / "run" / ".lora_ft.lock"
    _leave_record(lock_file, pid=os.getpid(), host=socket.gethostname(), process_start=1)
    with RunLock(lock_file, "output_dir run"):
        pass
    assert "taking over the lock left by pid" in caplog.text
    # Where flock is missing, the pid's start time tells a recycled pid from the holder.
    me = _process_start(os.getpid())
    assert RunLock._holder_dead({"pid": os.getpid(), "process_start": 1})
    assert not RunLock._holder_dead({"pid": os.getpid(), "process_start": me})


@pytest.mark.parametrize("age, held", [(5.0, True), (STALE_S + 60, False)], ids=["live heartbeat", "stopped"])
def test_a_lock_of_another_host_is_honoured_while_its_heartbeat_lives(age, held, tmp_path, caplog):
    """On a shared file system whose locks do not reach other machines, flock succeeds here although a process on
    another host may hold the run: its heartbeat (the file's mtime) decides."""
    lock_file = tmp_path / "run" / ".lora_ft.lock"
    _leave_record(lock_file, pid=4242, host="gpu-node-7")
    now = time.time()
    os.utime(lock_file, (now - age, now - age))
    if held:
        with pytest.raises(RunError, match=r"in use by another lora_ft process: pid 4242 on host gpu-node-7, started "
                                           r"2026-01-01T00:00:00\+00:00 \(lora-ft train r.yaml\); its heartbeat is "
                                           r"\d+ s old \(it counts as gone after 60 s without one\)"):
            RunLock(lock_file, "output_dir run").acquire()
        assert read_holder(lock_file)["host"] == "gpu-node-7"  # untouched
    else:
        with RunLock(lock_file, "output_dir run"):
            assert read_holder(lock_file)["pid"] == os.getpid()
        assert "taking over the lock left by pid 4242 on host gpu-node-7" in caplog.text
        assert "no heartbeat for" in caplog.text


def test_live_holder_names_a_writer_that_runs_and_no_one_else_without_touching_the_lock(tmp_path):
    """What a reader (lora-ft compare) asks: a live holder of this host or a fresh heartbeat of another is named; no
    file, a killed holder's record or a stopped heartbeat is no one. The lock file is only read."""
    lock_file = tmp_path / "run" / ".lora_ft.lock"
    assert live_holder(lock_file) is None and not lock_file.parent.exists()
    proc = _holder(lock_file, tmp_path)
    assert live_holder(lock_file).startswith(f"pid {proc.pid} on host {socket.gethostname()}, started ")
    with pytest.raises(RunError, match="in use by another lora_ft process"):  # the reader did not release it
        RunLock(lock_file).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert read_holder(lock_file)["pid"] == proc.pid and live_holder(lock_file) is None
    for age, holder in ((5.0, "pid 4242 on host gpu-node-7, started 2026-01-01T00:00:00+00:00 (lora-ft train "
                              "r.yaml)"), (STALE_S + 60, None)):
        _leave_record(lock_file, pid=4242, host="gpu-node-7")
        os.utime(lock_file, (time.time() - age, time.time() - age))
        assert live_holder(lock_file) == holder


def test_a_second_train_into_a_running_runs_folder_refuses_and_a_killed_run_is_taken_over(tiny_llama, chat_data,
                                                                                          tmp_path, capsys):
    """The issue's case: `train --overwrite` into the folder of a run in progress (another real process) used to
    delete its metrics and checkpoints. It refuses at once, naming that process, and changes nothing; after the
    process is killed, `--resume latest` takes the lock over and finishes the run."""
    import hashlib

    import yaml

    from lora_ft.cli import main

    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_llama)}, "data": {"train": str(chat_data["train"]), "max_length": 128},
        "train": {"max_steps": 100000, "micro_batch_size": 2, "checkpoint_every": 1, "keep_checkpoints": 2},
        "output_dir": str(out)}))
    proc = subprocess.Popen([sys.executable, "-m", "lora_ft", "train", str(recipe)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                            "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "step-00000002").exists():  # training, and checkpointing
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        holder = read_holder(out / ".lora_ft.lock")
        assert main(["train", str(recipe), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == (f"lora-ft: error: output_dir {out} is in use by another lora_ft process: pid {proc.pid} on host "
                       f"{holder['host']}, started {holder['started']} (lora-ft train {recipe}); wait for it to finish "
                       "or stop it, or choose another output_dir")
        # Nothing of the running run was touched: its config stays, nothing was set aside.
        config = hashlib.sha256((out / "run_config.yaml").read_bytes()).hexdigest()
        assert (out / "metrics.jsonl").is_file() and not (out / ".lora_ft.replaced").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert hashlib.sha256((out / "run_config.yaml").read_bytes()).hexdigest() == config
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "/adapter/" not in str(p))
    latest = max(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    steps = int(latest.removeprefix("step-")) + 1
    assert main(["train", str(recipe), "--resume", "latest", "--set", f"train.max_steps={steps}"]) == 0
    assert f"taking over the lock left by pid {proc.pid}" in capsys.readouterr().err
    after = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "/adapter/" not in str(p)
                   and not str(p.relative_to(out)).startswith("adapter/"))
    print(f"\nlock, after kill -9 of the holder: {before}\nafter the takeover run: {after}", file=sys.__stdout__)
    assert ".lora_ft.lock" in before and ".lora_ft.lock" not in after
    assert json.loads((out / "run_info.json").read_text())["steps_done"] == steps
