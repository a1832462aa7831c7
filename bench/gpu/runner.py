"""The GPU check's runner: runs a selected list of declared cases (``bench/gpu/cases.py``) within a time budget.

Each case is guarded: an exception (CUDA OOM included) is recorded with its type and message and the next case
runs; once the budget has elapsed the remaining ones are recorded as "skipped: time budget". After every case
the report (``bench/gpu/report.py``) is rewritten, so an interrupted run still leaves what finished.
Subprocesses run with ``sys.executable`` in the repo root, in their own process group, their output kept in
``cases.log``. Nothing here imports Ray.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from bench.gpu.cases import Case
from noiserefine.files import refuse_foreign_directory  # torch-free

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BUDGET_S = 270.0  # what the cases' cap_s are declared for
TAIL = 3000  # characters of a failing subprocess's output kept in the JSON
# Real-size families share what the budget leaves, by --tiny: each later family keeps RESERVE_S unless that
# leaves the current one under FAIR_S; a family's process (start-up, model build) is not started under LEAST_S.
RESERVE_S, FAIR_S, LEAST_S = {False: 75, True: 20}, {False: 45, True: 15}, {False: 25, True: 5}


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def error_record(error: BaseException) -> dict:
    message = str(error).strip()
    oom = "out of memory" in message.lower() or type(error).__name__ == "OutOfMemoryError"
    return {"type": type(error).__name__, "message": message.splitlines()[0][:500] if message else "", "oom": oom,
            "traceback": traceback.format_exc(limit=8)[-2000:]}


@dataclass
class Proc:
    returncode: int | None  # None: killed at its time limit
    output: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def tail(self, size: int = TAIL) -> str:
        return self.output[-size:]


class Stop(Exception):
    """A step of a case could not complete (its message is the case's failure reason)."""


class Runner:
    def __init__(self, cases: list[Case], out: Path, work: Path, device: str, tiny: bool, budget_s: float,
                 started: float):
        self.cases, self.out, self.work = cases, out, work
        refuse_foreign_directory(out, "cases.log", "an output folder of bench/gpu_check.py (--out)",
                                 also_ours=("gpu_report.json",))  # a user's folder: nothing replaced
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.device, self.tiny, self.budget_s, self.started = device, tiny, budget_s, started
        self.cuda = device == "cuda"
        self.deadline = started + budget_s
        self.results: dict[str, dict] = {}
        self.log_path = out / "cases.log"
        self.log_path.write_text(f"gpu_check {now_iso()} device {device} tiny {tiny}\n")
        self.started_iso = now_iso()

    # --- budget, log, results ------------------------------------------------------------------------------
    def remaining(self) -> float:
        return self.deadline - time.time()

    def cap(self, case: Case) -> float:
        """The most seconds ``case`` may take: its declared cap, scaled up with a budget above the default (a
        loaded machine given more time gives every case more, not only the last ones)."""
        return case.cap_s * max(1.0, self.budget_s / DEFAULT_BUDGET_S)

    def say(self, text: str) -> None:
        line = f"[gpu_check {time.time() - self.started:6.1f}s] {text}"
        print(line, flush=True)
        with open(self.log_path, "a") as handle:
            handle.write(line + "\n")

    def record(self, case: Case, status: str, seconds: float = 0.0, figures: dict | None = None, reason: str = "",
               error: dict | None = None) -> None:
        from bench.gpu import report

        summary = status + (f": {reason}" if reason else "")
        self.results[case.name] = {"name": case.name, "title": case.measures, "status": status, "reason": reason,
                                   "summary": summary, "seconds": round(seconds, 2), "figures": figures or {},
                                   "error": error}
        self.say(f"{case.name}: {summary} ({seconds:.1f} s)" + (f" [{error['type']}: {error['message']}]" if error else ""))
        report.write(self, final=False)

    # --- subprocesses ----------------------------------------------------------------------------------------
    def child_env(self, **extra: str) -> dict:
        drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "NOISEREFINE_TRAIN_EXIT_AFTER_STEP", "NOISEREFINE_FAULT_EXIT_ONCE", "NOISEREFINE_GPU_PROBE")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        paths = [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        if "NOISEREFINE_TRAIN_EXIT_AFTER_STEP" in extra:  # test-only fault injection, from outside the library
            paths.insert(0, str(REPO / "tests" / "hooks"))
        # No network on the GPU machine: nothing may wait on the Hugging Face hub (random init, local teacher).
        env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        if not self.cuda:
            env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
        env.update(extra)
        return env

    def start(self, label: str, command: list[str], **env: str) -> tuple:
        """Start ``command`` in the repo root (own process group), its output to a file (see :meth:`wait`)."""
        self.say(f"{label}: {' '.join(command)}")
        log = self.work / f"{label}.log"
        handle = open(log, "w")
        proc = subprocess.Popen(command, cwd=REPO, env=self.child_env(**env), stdout=handle,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        return label, command, proc, handle, log, time.perf_counter()

    def wait(self, running: tuple, timeout: float) -> Proc:
        """Wait for a started command; its whole process group is killed after ``timeout`` seconds."""
        label, command, proc, handle, log, started = running
        try:
            code: int | None = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            code = None
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        handle.close()
        seconds = time.perf_counter() - started
        output = log.read_text(errors="replace")
        with open(self.log_path, "a") as out:
            out.write(f"\n===== {label} (exit {code if code is not None else 'KILLED at its time limit'}, "
                      f"{seconds:.1f} s): {' '.join(command)}\n{output}\n===== end {label}\n")
        self.say(f"{label}: exit {code if code is not None else 'killed (time limit)'} after {seconds:.1f} s")
        return Proc(code, output, seconds)

    def run(self, label: str, command: list[str], timeout: float, **env: str) -> Proc:
        return self.wait(self.start(label, command, **env), timeout)

    # --- the three kinds of case -----------------------------------------------------------------------------
    def run_pytest(self, case: Case) -> None:
        base = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-p", "no:cacheprovider"]
        if case.needs == "cuda" and not self.cuda:  # only check that the tests import and collect
            proc = self.run(case.name, base + ["--collect-only", "-q"], min(self.cap(case), self.remaining()))
            collected = re.findall(r"^tests/test_gpu\.py::(\S+)$", proc.output, flags=re.M)
            figures = {"collected": len(collected), "tests": collected, "seconds_collect": round(proc.seconds, 2)}
            if proc.returncode == 0 and collected:
                self.record(case, "skipped", proc.seconds, figures, reason="no CUDA")
            else:
                self.record(case, "failed", proc.seconds, {**figures, "output_tail": proc.tail()},
                            reason=f"collecting the gpu tests failed (exit {proc.returncode})")
            return
        proc = self.run(case.name, base + ["-q", "-rA"], min(self.cap(case), self.remaining()))
        counts = {key: int(n) for n, key in re.findall(r"(\d+) (passed|failed|errors?|skipped)", proc.output)}
        figures = {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0),
                   "errors": counts.get("error", 0) + counts.get("errors", 0), "skipped": counts.get("skipped", 0),
                   "passed_tests": re.findall(r"^PASSED (\S+)", proc.output, flags=re.M),
                   "failed_tests": re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.output, flags=re.M)}
        if proc.returncode == 0 and figures["passed"] > 0:
            self.record(case, "ok", proc.seconds, figures)
        else:
            reason = "killed at its time limit" if proc.timed_out else f"pytest exit {proc.returncode}"
            self.record(case, "failed", proc.seconds, {**figures, "output_tail": proc.tail()}, reason=reason)

    def run_digits(self, case: Case) -> None:
        from bench.gpu.digits import run_digits

        started, figures = time.perf_counter(), {}
        try:
            run_digits(self, case, figures)
        except Stop as stop:
            self.record(case, "failed", time.perf_counter() - started, figures, reason=str(stop))
            return
        except Exception as error:  # noqa: BLE001
            self.record(case, "failed", time.perf_counter() - started, figures, reason="exception",
                        error=error_record(error))
            return
        self.record(case, "ok", time.perf_counter() - started, figures)

    def run_realsize(self, family: str, cases: list[Case], reserve_after: float) -> None:
        """All of one family's real-size cases in one process (``bench/gpu/realsize.py``: one model build)."""
        if self.remaining() <= LEAST_S[self.tiny]:
            for case in cases:
                self.record(case, "skipped", reason="time budget")
            return
        # Leave the later families their reserve if that still leaves this one a fair share; else (being
        # more important) this one takes all that is left.
        deadline = self.deadline - reserve_after
        if deadline - time.time() < FAIR_S[self.tiny]:
            deadline = self.deadline
        results = self.work / f"{family}.jsonl"
        results.unlink(missing_ok=True)
        command = [sys.executable, "-m", "bench.gpu.realsize", "--cases", ",".join(c.name for c in cases),
                   "--device", "cuda" if self.cuda else "cpu", "--deadline", f"{deadline:.1f}",
                   "--results", str(results)] + (["--tiny"] if self.tiny else [])
        # killed a little after its own deadline (a measurement in flight), never past the budget
        proc = self.run(f"realsize_{family}", command, min(deadline + 15, self.deadline + 5) - time.time())
        started, partial, done = set(), {}, {}
        if results.is_file():
            for line in results.read_text().splitlines():
                entry = json.loads(line)
                if entry.get("event") == "start":
                    started.add(entry["case"])
                elif entry.get("event") == "partial":
                    partial[entry["case"]] = entry["figures"]
                else:
                    done[entry["case"]] = entry
        for case in cases:
            if case.name in done:
                entry = done[case.name]
                figures = entry["figures"]
                if entry["status"] == "failed" and proc.returncode not in (0, None):
                    figures = {**figures, "output_tail": proc.tail()}
                self.record(case, entry["status"], entry["seconds"], figures, entry.get("reason", ""),
                            entry.get("error"))
            elif proc.timed_out:
                if case.name in started:
                    self.record(case, "failed", 0.0, {**partial.get(case.name, {}), "output_tail": proc.tail(1500)},
                                reason="killed at the time budget while running"
                                       + (" (the measurements it finished are kept)" if case.name in partial else ""))
                else:
                    self.record(case, "skipped", reason="time budget")
            else:
                self.record(case, "failed", proc.seconds, {"output_tail": proc.tail()},
                            reason=f"the measuring process ended (exit {proc.returncode}) before this case")

    # --- driver ----------------------------------------------------------------------------------------------
    def guarded(self, cases: list[Case], fn, *args) -> None:
        """``fn(*args)``, which records ``cases``; a crash of the check itself fails the ones it left unrecorded."""
        if self.remaining() <= 0:
            for case in cases:
                self.record(case, "skipped", reason="time budget")
            return
        started = time.perf_counter()
        try:
            fn(*args)
        except Exception as error:  # noqa: BLE001
            for case in cases:
                if case.name not in self.results:
                    self.record(case, "failed", time.perf_counter() - started, reason="exception",
                                error=error_record(error))

    def run_all(self) -> None:
        """The selected cases in declaration order; the real-size ones of a family together, at the first."""
        families = list(dict.fromkeys(c.family for c in self.cases if c.runner == "realsize"))
        for case in self.cases:
            if case.runner == "pytest":
                self.guarded([case], self.run_pytest, case)
            elif case.runner == "digits":
                self.guarded([case], self.run_digits, case)
            elif case.runner == "realsize" and case.family in families:
                index = families.index(case.family)
                group = [c for c in self.cases if c.family == case.family and c.runner == "realsize"]
                reserve = sum(RESERVE_S[self.tiny] for later in families[index + 1:] if later)
                self.guarded(group, self.run_realsize, case.family, group, reserve)
                families[index] = None  # run once
            elif case.runner not in ("pytest", "digits", "realsize"):
                raise ValueError(f"case {case.name}: unknown runner {case.runner!r}")
