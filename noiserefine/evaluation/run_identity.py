"""What determines an evaluation's results: the identity records behind the store keys and the run key,
and the output directory's claim (``evaluation.json``: one ``--out`` belongs to one run key).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..files import refuse_foreign_directory, write_text_atomic
from .protocols import FID_IMAGE_RULE, Protocol
from .settings import Setting, guidance_record
from .store import record_key

FORMAT_VERSION = 1
EVALUATION_FILE = "evaluation.json"


def without_paths(record: dict | None) -> dict | None:
    """A weights record minus where the files are (moving them keeps the results)."""
    if record is None:
        return None
    return {k: (without_paths(v) if isinstance(v, dict) else v) for k, v in record.items()
            if not k.endswith("path")}


def assign_row_identities(rows: list[Setting], *, protocol: Protocol, steps: int, resolution: int, inception,
                          text_image, main_model: dict, sampler: dict) -> dict[str, str]:
    """Complete each row's ``identity`` (what determines its samples and scores, never ``num_samples``,
    the batch size or the device); returns each row's key."""
    features = {"inception": without_paths(inception.record) if inception else None,
                "text_image": without_paths(text_image.record) if text_image else None}
    common = {"format": FORMAT_VERSION, "protocol": protocol.identity, "num_steps": steps,
              "image_rule": {"rule": FID_IMAGE_RULE, "resolution": resolution}, "features": features}
    row_keys = {}
    for row in rows:
        row.identity = {**common, "row": row.slug, "model": main_model, "sampler": sampler,
                        "guidance": guidance_record(row.guidance), **row.identity}
        row_keys[row.slug] = record_key(row.identity)
    return row_keys


def reference_identity(protocol: Protocol, inception, resolution: int) -> dict | None:
    """What determines the FID reference's statistics; None without a reference or an Inception network."""
    if not protocol.reference_path or inception is None:
        return None
    if protocol.reference_files is None:
        return {"kind": "statistics file", "sha256": protocol.record["reference"]["sha256"]}
    root = Path(protocol.reference_path).expanduser()
    listing = [(str(p.relative_to(root)), p.stat().st_size) for p in protocol.reference_files]
    return {"format": FORMAT_VERSION, "kind": "folder", "files_sha256": record_key({"files": listing}),
            "num_images": len(listing), "image_rule": {"rule": FID_IMAGE_RULE, "resolution": resolution},
            "inception": without_paths(inception.record)}


def claim_output(out: Path, run_key: str, run_record: dict) -> None:
    """Create ``out`` for this run, or refuse it when it holds another run key (naming what differs) or is
    not an evaluation's folder at all (a user's non-empty folder: nothing in it is replaced)."""
    refuse_foreign_directory(out, EVALUATION_FILE, "an output folder of python -m noiserefine.evaluate (--out)")
    path = out / EVALUATION_FILE
    if path.is_file():
        try:
            existing = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: unreadable ({error}); use another --out") from None
        if existing.get("run_key") != run_key:
            old, new = existing.get("run", {}), run_record
            differing = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            if isinstance(old.get("rows"), dict):
                differing += [f"rows.{k}" for k in sorted(set(old["rows"]) | set(new["rows"]))
                              if old["rows"].get(k) != new["rows"].get(k)]
            raise ValueError(f"{out} holds an evaluation of another configuration (differs in: "
                             f"{', '.join(differing) or 'run key'}); use another --out (a shared --store keeps "
                             "the rows both have in common)")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"run_key": run_key, "run": run_record, "finished": False},
                                       indent=2, sort_keys=True) + "\n")


def write_finished(out: Path, run_key: str, run_record: dict, stores: dict) -> None:
    """Mark ``out``'s run finished (after its report is written), with where each row's store is."""
    write_text_atomic(out / EVALUATION_FILE, json.dumps(
        {"run_key": run_key, "run": run_record, "finished": True,
         "stores": {slug: str(store.directory) for slug, store in stores.items()}},
        indent=2, sort_keys=True) + "\n")
