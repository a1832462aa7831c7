#!/usr/bin/env python3
"""Proof on a GPU: one command that runs the project's GPU paths and writes a report.

    python3 bench/gpu_check.py --out gpu-report                    # on the GPU machine (~4.5 min at most)
    .venv/bin/python bench/gpu_check.py --device cpu --tiny --out /tmp/gpu-check   # CPU smoke run (1-2 min)

Without CUDA it always runs the tiny CPU mode (``--out`` defaults to runs/gpu-check).

Writes ``gpu_report.json``, ``gpu_report.md`` and ``cases.log`` (every subprocess's output) into ``--out``, and
prints the Markdown report at the end. Scratch files (teacher, cache, runs) go to ``--work`` (default: a temp
dir, removed at the end). Exit status 1 if any case failed.

The cases are declared in ``bench/gpu/cases.py`` (by importance: ``gpu_tests``, ``digits_deepspeed``, then
SD 2.1 and SDXL at real size with random weights: ``*_generation``, ``*_losses``, ``*_sampling``); the runner
is ``bench/gpu/runner.py``, the real-size measurements ``bench/gpu/realsize.py`` and ``bench/gpu/measure.py``
(which also count FLOPs and report MFU, ``noiserefine/flops.py``). With ``--tiny`` every case runs on tiny
models of the same classes (CPU). Nothing here imports Ray.
"""

from __future__ import annotations

import time

STARTED = time.time()  # the time budget counts from here, before the heavy imports

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.gpu import cases, report  # noqa: E402
from bench.gpu.markdown import markdown  # noqa: E402
from bench.gpu.runner import DEFAULT_BUDGET_S, Runner  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"),
                        help="where gpu_report.json/.md and cases.log go (default runs/gpu-check)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--tiny", action="store_true", help="tiny models of the same classes (the CPU smoke run)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"after this many seconds the remaining cases are skipped (default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch directory")
    parser.add_argument("--cases", default="",
                        help=f"comma list of cases or prefixes (default all): {[c.name for c in cases.CASES]}")
    args = parser.parse_args(argv)
    try:
        selected = cases.select(args.cases)
    except ValueError as error:
        parser.error(str(error))
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda but torch sees no CUDA device")
    elif not args.tiny:  # real-size models on the CPU would take hours (and `make bench` runs this without args)
        print("gpu_check: no CUDA device: running the CPU mode on tiny models (--tiny)", flush=True)
        args.tiny = True
    if args.tiny:
        selected = [case.for_tiny() for case in selected]

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the teacher is trained in this process; never wait on the hub
    work = (args.work or Path(tempfile.mkdtemp(prefix="noiserefine-gpu-check-"))).resolve()
    runner = Runner(selected, args.out.resolve(), work, args.device, args.tiny, args.budget_s, STARTED)
    runner.say(f"device {args.device}, tiny {args.tiny}, budget {args.budget_s:.0f} s, work {work}, out {args.out}")
    interrupted = False
    try:
        runner.run_all()
    except KeyboardInterrupt:
        interrupted = True
        runner.say("interrupted: writing the report of what finished")
    data = report.write(runner, final=True)
    if not args.keep_work and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + markdown(data), flush=True)
    failed = [c["name"] for c in data["cases"] if c["status"] == "failed"]
    print(f"report: {args.out / 'gpu_report.json'}, {args.out / 'gpu_report.md'}; wall {data['wall_s']} s; "
          + (f"FAILED: {', '.join(failed)}" if failed else "no case failed"), flush=True)
    return 1 if failed or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
