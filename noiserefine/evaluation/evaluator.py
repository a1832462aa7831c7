"""The trainer's periodic evaluation: guided teacher, unguided and refined rows on the held-out set.

Any backend: a grid PNG always; metrics when the caller injects a metric function
(``evaluation.rows.MetricFn``), appended to ``eval_log.csv``.
"""

from __future__ import annotations

import functools
from pathlib import Path

from ..files import append_csv
from ..guidance import make_guider
from .grids import save_rows_grid
from .rows import MetricFn, eval_set, sample_row, score_rows

EVAL_LOG = "eval_log.csv"


class Evaluator:
    """Unguided Gaussian vs refined noise on the fixed held-out seeds (rank 0).

    The guided-teacher and unguided rows do not depend on the refiner: sampled and
    scored once, then reused.
    """

    def __init__(self, cfg, backend, output_dir: Path, metric_fn: MetricFn | None = None):
        self.cfg, self.backend, self.output_dir, self.metric_fn = cfg, backend, Path(output_dir), metric_fn
        self.evals = eval_set(cfg)
        self.fixed = None

    def _score(self, rows) -> None:
        if self.metric_fn is not None:
            score_rows(rows, self.backend, self.evals, self.metric_fn)

    def __call__(self, refiner, step: int) -> dict:
        """Sample, score and draw the rows at ``step``; returns ``{"text", "rows": {name: metrics}}``."""
        cfg, backend = self.cfg, self.backend
        steps, batch = cfg.student.num_steps, cfg.eval.batch_size
        if self.fixed is None:
            self.fixed = [sample_row("guided teacher", backend, self.evals, steps,
                                     guidance=make_guider(cfg.teacher), batch_size=batch),
                          sample_row("unguided", backend, self.evals, steps, batch_size=batch)]
            self._score(self.fixed)
        # a refiner of several guidance scales is evaluated at the guided row's scale, teacher.guidance_scale
        scale = float(cfg.teacher.guidance_scale) if refiner.guidance_conditioned else None
        refined = sample_row("refined", backend, self.evals, steps, batch_size=batch,
                             prepare_noise=functools.partial(refiner.refine, guidance_scale=scale))
        self._score([refined])
        rows = [*self.fixed, refined]
        save_rows_grid(rows, backend, cfg.eval.grid_columns, self.output_dir / f"eval_step{step}.png")
        results = {row.name: row.metrics for row in rows}
        if self.metric_fn is None:
            return {"text": f"eval step {step}: grid only (no metrics configured)", "rows": results}
        fields = ("step", "row", *sorted(k for k in results["refined"] if k not in ("nfe", "seconds_per_sample")))
        for name, metrics in results.items():
            append_csv(self.output_dir / EVAL_LOG, fields, {"step": step, "row": name, **metrics})
        text = ", ".join(f"{name}: " + " ".join(f"{k} {v:.4g}" for k, v in m.items()
                                                  if k not in ("nfe", "seconds_per_sample", "num_samples"))
                         for name, m in results.items())
        return {"text": f"eval step {step}: {text}", "rows": results}
