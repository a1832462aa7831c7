"""The chaos bench's checks (``bench/chaos.py``): the faulted run against the clean reference.

Each check returns ``(ok, lines)``: ``lines`` say what was compared and, on a failure, exactly what differs.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from pathlib import Path

from chaos_faults import Request

SHARD_RE = re.compile(r"^shard-\d{6}(-n\d+)?\.tar$")


def shard_puts(log: list[Request], prefix: str, app: str | None = None) -> list[Request]:
    """Successful single PUTs of shard objects under ``prefix`` (``bucket/key``), by ``app`` if given."""
    return [r for r in log if r.method == "PUT" and 200 <= r.status < 300 and not r.query
            and r.key.startswith(prefix + "/") and SHARD_RE.match(r.key[len(prefix) + 1:])
            and (app is None or r.app == app)]


def check_shards(store, reference: Path) -> tuple[bool, list[str]]:
    """Every shard object byte-identical (sha256) to the reference cache's file, the same set of shards, the same
    manifest, and nothing moved aside (``rejected-*``)."""
    from noiserefine.shards import read_manifest

    names = store.names()
    got = sorted(n for n in names if SHARD_RE.match(n))
    want = sorted(p.name for p in reference.glob("shard-*.tar"))
    lines, ok = [], got == want
    if got != want:
        lines.append(f"shard objects {got} != reference {want}")
    differing = [name for name in sorted(set(got) & set(want)) if hashlib.sha256(store.read_bytes(name)).hexdigest()
                 != hashlib.sha256((reference / name).read_bytes()).hexdigest()]
    if differing:
        ok = False
        lines.append(f"shards whose bytes differ from the reference: {differing}")
    if read_manifest(store.location) != read_manifest(reference):
        ok = False
        lines.append("the manifest differs from the reference's")
    rejected = [n for n in names if n.startswith("rejected-")]
    if rejected:
        ok = False
        lines.append(f"moved aside: {rejected}")
    identical = len(set(got) & set(want)) - len(differing)
    lines.insert(0, f"shards byte-identical (sha256) to the clean run's: {identical}/{len(want)}, manifest "
                    f"{'equal' if read_manifest(store.location) == read_manifest(reference) else 'DIFFERENT'}")
    return ok, lines


def check_single_puts(log: list[Request], prefix: str, t0: float) -> tuple[bool, list[str]]:
    """No shard object PUT twice, counted in the server's request log (2xx single PUTs per key, any job)."""
    by_key: dict[str, list[Request]] = defaultdict(list)
    for request in shard_puts(log, prefix):
        by_key[request.key.rsplit("/", 1)[-1]].append(request)
    twice = {key: puts for key, puts in sorted(by_key.items()) if len(puts) > 1}
    lines = [f"shard PUTs: {sum(len(p) for p in by_key.values())} for {len(by_key)} shard keys, "
             f"{len(twice)} key(s) PUT more than once"]
    for key, puts in twice.items():
        same = len({p.etag for p in puts}) == 1
        lines.append(f"  {key}: " + ", ".join(f"{p.app or '?'} at {p.t - t0:.1f} s" for p in puts)
                     + (" (same ETag: same bytes)" if same else " (DIFFERENT ETags: overwritten with other bytes)"))
    return not twice, lines


def check_lease_respected(log: list[Request], prefix: str, t0: float, stalled: str, taker: str,
                          t_cont: float | None) -> tuple[bool, list[str]]:
    """The stalled job wrote nothing once the other job had taken its lease over (the taker's successful
    ``If-Match`` PUT of ``.lock``); writes are split into those during the stall and those after SIGCONT."""
    takeovers = [r for r in log if r.app == taker and r.method == "PUT" and r.conditional == "If-Match"
                 and 200 <= r.status < 300 and r.key == prefix + "/.lock"]
    if not takeovers:
        return False, [f"job {taker} never took the lease over"]
    t_take = takeovers[0].t
    late = [r for r in log if r.app == stalled and r.is_write and r.t > t_take and r.key.startswith(prefix + "/")]
    lines = [f"lease taken over by {taker} at {t_take - t0:.1f} s; writes by {stalled} after that: {len(late)}"]
    for r in late:
        when = "after SIGCONT" if t_cont is not None and r.t >= t_cont else "during the stall"
        lines.append(f"  {r.method} {r.key[len(prefix) + 1:]} -> {r.status} at {r.t - t0:.1f} s ({when})")
    return not late, lines


def compare_refiners(reference: Path, run: Path, exact: bool, rtol: float, atol: float) -> tuple[bool, list[str]]:
    """The final refiners (``refiner/refiner.safetensors``): bit-equal, or within ``rtol``/``atol``."""
    import torch
    from safetensors.torch import load_file

    x = load_file(str(reference / "refiner" / "refiner.safetensors"))
    y = load_file(str(run / "refiner" / "refiner.safetensors"))
    if x.keys() != y.keys():
        return False, [f"refiner tensors differ: {sorted(set(x) ^ set(y))[:5]}"]
    diff = max(float((x[k].float() - y[k].float()).abs().max()) for k in x)
    if exact:
        ok = all(torch.equal(x[k], y[k]) for k in x)
        return ok, [f"refiner {'bit-equal' if ok else 'NOT bit-equal'} to the uninterrupted run's (max |diff| "
                    f"{diff:.3g})"]
    bad = [k for k in x if not torch.allclose(y[k].float(), x[k].float(), rtol=rtol, atol=atol)]
    return not bad, [f"refiner within rtol {rtol:g}, atol {atol:g} of the uninterrupted run's: "
                     f"{'yes' if not bad else f'NO ({len(bad)} tensors, e.g. {bad[0]})'} (max |diff| {diff:.3g})"]
