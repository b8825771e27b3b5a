"""Built-in plugin ``eigenvector_similarity``: rotation of the top-k Hessian eigenvectors (MATH.md §5;
Wang & Roberts, "Can stability be detrimental?", seed 002 §2–3).

The top-k eigenvectors come from the snapshot's shared Lanczos run (requested at attach time); the
plugin keeps those of the last measurement and of a *reference* measurement, and logs, for i = 1..k
(all cosines are sign-invariant, |⟨v_i(t), v_j(t′)⟩| for unit vectors):

- ``eigvec/cos_prev_<i>``: |⟨v_i(t), v_i(t_prev)⟩|, the i-th eigenvector similarity with the previous
  measurement, by index (the paper's quantity);
- ``eigvec/match_prev_<i>`` and ``eigvec/matched_cos_prev_<i>``: the previous eigenvector j (1-based)
  matched to v_i by overlap (Hungarian assignment maximising Σ|cos|, so eigenvalue crossings are
  followed by direction, not by index) and its |cos|; ``eigvec/swaps_prev``: how many i have j ≠ i;
- ``eigvec/subspace_prev``: similarity of the top-k subspaces, √((1/k) Σ σ_i²) with σ_i the cosines of
  the principal angles (the "cosine-Grassmannian" default of :mod:`sgdprobe.linalg.subspace`, = |cos|
  for k = 1); ``eigvec/subspace_prev_fs``: Π σ_i (Fubini–Study); ``eigvec/grassmann_prev``: Ye & Lim's
  geodesic distance (Σ θ_i²)^{1/2} in radians;
- the same with ``ref`` in place of ``prev`` against the reference, and ``eigvec/ref_step``: the step of
  the reference measurement.

The reference is (``reference=``):

- ``"eos"`` (default): the measurement at which the edge-of-stability ratio last crossed 1 upwards
  (sharpness/threshold, the start of an instability; the preconditioned sharpness when the optimizer
  preconditions, as ``sharpness/eos_ratio``); before any crossing, the first measurement;
- ``"first"``: the first measurement;
- an integer N: the first measurement at or after step N (before it, the first measurement);

and whatever the user sets with :meth:`EigenvectorSimilarity.set_reference` (the next measurement, or
given vectors), until the next event of the mode. The plugin instance is reachable as
``probe.pm.get_plugin("eigenvector_similarity")``. Its state (last and reference eigenvectors, as CPU
tensors) is saved with the probe's ``state_dict`` so that a resumed run keeps the same reference.
"""

from __future__ import annotations

import math
from typing import Any

import torch

import sgdprobe
from sgdprobe.linalg import subspace

_STORAGE = ("device", "cpu")
_MODES = ("eos", "first")


class EigenvectorSimilarity:
    """Similarity of the top-``k`` Hessian eigenvectors with the previous and a reference measurement."""

    name = "eigenvector_similarity"

    def __init__(self, k: int = 3, storage: str = "device", reference: str | int = "eos"):
        """:param k: number of top eigenvectors tracked.
        :param storage: keep the stored eigenvectors (2 × P × k numbers) on the model's ``"device"`` or in
            host memory (``"cpu"``, for large models; the comparison then runs on the CPU).
        :param reference: ``"eos"``, ``"first"`` or a step number (see the module docstring)."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise sgdprobe.ConfigError(f"eigenvector_similarity: k must be a positive integer, got {k!r}")
        if storage not in _STORAGE:
            raise sgdprobe.ConfigError(
                f"eigenvector_similarity: storage must be one of {_STORAGE}, got {storage!r}"
            )
        valid_step = isinstance(reference, int) and not isinstance(reference, bool) and reference >= 0
        if not (valid_step or reference in _MODES):
            raise sgdprobe.ConfigError(
                f"eigenvector_similarity: reference must be one of {_MODES} or a step number >= 0, "
                f"got {reference!r}"
            )
        self.k = k
        self.storage = storage
        self.reference = reference
        self.preconditioned = False
        self._dim: int | None = None
        self._device = torch.device("cpu")
        self._reset()

    def _reset(self) -> None:
        self._prev: torch.Tensor | None = None
        self._prev_step = -1
        self._prev_eos: float | None = None
        self._ref: torch.Tensor | None = None
        self._ref_step = -1
        self._ref_source = ""
        self._pending_user = False
        self._step_event_done = False

    # ----------------------------------------------------------------- user API
    @property
    def eigenvectors(self) -> torch.Tensor | None:
        """The top-k eigenvectors (P × k, unit columns, largest eigenvalue first) of the last measurement."""
        return self._prev

    @property
    def reference_vectors(self) -> torch.Tensor | None:
        """The reference eigenvectors (P × k′)."""
        return self._ref

    @property
    def reference_step(self) -> int:
        """Step of the reference measurement (−1 if none yet)."""
        return self._ref_step

    def set_reference(self, vectors: torch.Tensor | None = None) -> None:
        """Make the next measurement the reference, or use ``vectors`` (P × m columns, or a P vector)
        from now on. Either is kept until the next event of the ``reference`` mode."""
        if vectors is None:
            self._pending_user = True
            return
        v = vectors.detach().reshape(vectors.shape[0], -1)
        if self._dim is not None and v.shape[0] != self._dim:
            raise sgdprobe.ConfigError(
                f"eigenvector_similarity: reference vectors have length {v.shape[0]}, the probed "
                f"parameters {self._dim}"
            )
        if not v.is_floating_point() or not torch.isfinite(v).all() or (v.norm(dim=0) == 0).any():
            raise sgdprobe.ConfigError("eigenvector_similarity: reference vectors must be finite, non-zero")
        self._ref = self._store(v)
        self._ref_step = self._prev_step
        self._ref_source = "user"
        self._pending_user = False

    # ----------------------------------------------------------------- hooks
    @sgdprobe.hookimpl
    def sgdprobe_configure(self, config: sgdprobe.ProbeConfig) -> None:
        config.request_eigenpairs(self.k)
        info = sgdprobe.describe_optimizer(config.optimizer, config.lr)
        self.preconditioned = info.preconditioned
        if self.preconditioned:
            config.request_eigenpairs(1, preconditioned=True)
        params = dict(config.model.named_parameters())
        self._dim = sum(params[n].numel() for n in config.param_names)
        self._device = config.device

    @sgdprobe.hookimpl
    def sgdprobe_layout(self):
        idx = range(1, self.k + 1)
        return {
            "eigenvector similarity to the previous measurement": [
                *(f"eigvec/cos_prev_{i}" for i in idx),
                "eigvec/subspace_prev",
            ],
            "eigenvector similarity to the reference": [
                *(f"eigvec/cos_ref_{i}" for i in idx),
                "eigvec/subspace_ref",
            ],
            "matched eigenvector similarity (previous)": [f"eigvec/matched_cos_prev_{i}" for i in idx],
            "eigenvector matching (previous index)": [f"eigvec/match_prev_{i}" for i in idx],
            "reference step": ["eigvec/ref_step"],
        }

    @sgdprobe.hookimpl
    def sgdprobe_measure(self, snapshot: sgdprobe.Snapshot):
        eig = snapshot.hessian_eigenpairs(self.k)
        current = eig.eigenvectors.detach()
        eos = self._eos_ratio(snapshot, float(eig.eigenvalues[0]))
        out: dict[str, float] = {}
        if self._prev is not None:
            out.update(self._compare("prev", current, self._prev))
        event = self._reference_event(snapshot.step, eos)
        stored = self._store(current)
        if event:
            self._ref, self._ref_step, self._ref_source = stored, snapshot.step, event
            self._pending_user = False
        if self._ref is not None:
            out.update(self._compare("ref", current, self._ref))
            out["eigvec/ref_step"] = float(self._ref_step)
        self._prev, self._prev_step = stored, snapshot.step
        if eos is not None:
            self._prev_eos = eos
        return out

    @sgdprobe.hookimpl
    def sgdprobe_state_dict(self) -> dict[str, Any]:
        def cpu(t):
            return None if t is None else t.detach().cpu().clone()

        return {
            "k": self.k,
            "prev": cpu(self._prev),
            "prev_step": self._prev_step,
            "prev_eos": self._prev_eos,
            "ref": cpu(self._ref),
            "ref_step": self._ref_step,
            "ref_source": self._ref_source,
            "pending_user": self._pending_user,
            "step_event_done": self._step_event_done,
        }

    @sgdprobe.hookimpl
    def sgdprobe_load_state_dict(self, state) -> None:
        for key in ("prev", "ref"):
            t = state.get(key)
            if t is not None and self._dim is not None and t.shape[0] != self._dim:
                raise sgdprobe.ConfigError(
                    f"eigenvector_similarity: the saved {key} eigenvectors have length {t.shape[0]}, the "
                    f"probed parameters {self._dim} (a different model?)"
                )
        self._reset()
        self._prev = None if state.get("prev") is None else self._store(state["prev"])
        self._ref = None if state.get("ref") is None else self._store(state["ref"])
        self._prev_step = int(state.get("prev_step", -1))
        eos = state.get("prev_eos")
        self._prev_eos = None if eos is None else float(eos)
        self._ref_step = int(state.get("ref_step", -1))
        self._ref_source = str(state.get("ref_source", ""))
        self._pending_user = bool(state.get("pending_user", False))
        self._step_event_done = bool(state.get("step_event_done", False))

    # ----------------------------------------------------------------- internals
    def _store(self, v: torch.Tensor) -> torch.Tensor:
        device = torch.device("cpu") if self.storage == "cpu" else self._device
        return v.detach().to(device).clone()

    def _eos_ratio(self, snapshot: sgdprobe.Snapshot, lambda_max: float) -> float | None:
        """Sharpness / threshold (MATH.md §1.1–1.2), as ``sharpness/eos_ratio``; ``None`` if unknown."""
        threshold = snapshot.stability_threshold()
        if threshold is None:
            return None
        sharp = lambda_max
        if snapshot.preconditioner_scale() is not None:
            try:
                sharp = float(snapshot.hessian_eigenpairs(1, preconditioned=True).eigenvalues[0])
            except sgdprobe.MeasurementError:
                return None  # no event at this step; the similarities are still logged
        return sharp / threshold

    def _reference_event(self, step: int, eos: float | None) -> str:
        """Why the current measurement becomes the reference ('' if it does not)."""
        if isinstance(self.reference, int) and not self._step_event_done and step >= self.reference:
            self._step_event_done = True
            return "step"
        if self.reference == "eos" and eos is not None and self._prev_eos is not None:
            if self._prev_eos < 1.0 <= eos:
                return "eos"
        if self._pending_user:
            return "user"
        if self._ref is None:
            return "first"
        return ""

    def _compare(self, which: str, current: torch.Tensor, stored: torch.Tensor) -> dict[str, float]:
        """The logged similarities of ``current`` (P × k) with ``stored`` (P × l) (MATH.md §5)."""
        if self.storage == "cpu":
            current = current.cpu()
        else:
            stored = stored.to(current.device)
        m = min(current.shape[1], stored.shape[1])
        cos = subspace.cosine_similarity(current[:, :m], stored[:, :m])
        match, matched = subspace.match_by_overlap(current, stored)
        sigma = subspace.principal_cosines(current, stored)
        theta = subspace.principal_angles(current, stored)
        out = {f"eigvec/cos_{which}_{i + 1}": float(c) for i, c in enumerate(cos)}
        out[f"eigvec/subspace_{which}"] = float(sigma.square().mean().sqrt())
        out[f"eigvec/subspace_{which}_fs"] = float(sigma.prod())
        out[f"eigvec/grassmann_{which}"] = math.sqrt(float(theta.square().sum()))
        for i, (j, c) in enumerate(zip(match, matched)):
            out[f"eigvec/match_{which}_{i + 1}"] = float(j + 1)
            out[f"eigvec/matched_cos_{which}_{i + 1}"] = float(c)
        out[f"eigvec/swaps_{which}"] = float(sum(1 for i, j in enumerate(match) if j != i))
        return out
