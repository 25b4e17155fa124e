"""A fork server for fault tests: imports train.py once, then forks a fresh training process per request.

Every training run is a real OS process (its own pid, killable with SIGKILL, its own run lock), but
starts in milliseconds instead of re-importing torch, diffusers and accelerate each time; with dozens of
kills per test that is the difference between seconds and minutes. One thread everywhere, so that
float arithmetic is the same in every child.

Protocol: one JSON object per stdin line, one JSON answer per stdout line.
    {"cmd": "start", "argv": [...], "out": PATH, "err": PATH, "env": {...}, "fsize": BYTES|null} -> {"pid": N}
    {"cmd": "wait", "pid": N, "timeout": S} -> {"status": exit code, -signal, or null if still running}
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import atexit  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

import train  # noqa: E402
from latent_ddpm.errors import run_cli  # noqa: E402


def child(request: dict) -> None:
    """Runs in the forked process; never returns."""
    code = 1
    try:
        os.environ.update(request.get("env") or {})
        if request.get("fsize"):
            resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
        for fd, path in ((1, request["out"]), (2, request["err"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        try:
            code = run_cli(train.main, request["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        atexit._run_exitfuncs()  # releases the run lock as a normal exit would
    except BaseException:  # noqa: BLE001 - report, then exit like an uncaught error
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def serve() -> None:
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "start":
            pid = os.fork()
            if pid == 0:
                child(request)
            print(json.dumps({"pid": pid}), flush=True)
        elif request["cmd"] == "wait":
            print(json.dumps({"status": wait(request["pid"], request["timeout"])}), flush=True)


if __name__ == "__main__":
    serve()
