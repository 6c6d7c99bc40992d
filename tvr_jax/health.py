"""Training-health guard: notice a run whose contrastive loss is saturated, instead of training on.

The train step reports `saturated` (`tvr_jax.losses.saturated_fraction` of the batch's similarity
matrix: the share of queries whose scale-100 softmax puts all its mass on a wrong match, so NegNCE
clips every probability and gives no gradient). The loop hands its log-step metrics to
`SaturationGuard.check`; when every log step of a window of at least `window` steps was saturated,
the guard prints ONE line with the step range and the likely causes (`warn`) or raises
`TrainingSaturatedError` (`stop`). The window is measured on log steps, the only steps whose
metrics reach the host (a check costs no extra device sync).
"""

from __future__ import annotations

from collections.abc import Mapping

from tvr_jax import reporting

POLICIES = ("warn", "stop", "off")
THRESHOLD = 0.9   # share of saturated queries that counts as "saturated" (a few rows may escape)


class TrainingSaturatedError(RuntimeError):
  """The contrastive loss stayed saturated for a window of steps (saturation_policy='stop')."""


def message(first: int, last: int, saturated: float, loss: float, grad_norm: float) -> str:
  """The one console line: what happened, over which steps, and what usually causes it."""
  return (f"training saturated from step {first} to {last}: {100 * saturated:.0f}% of queries "
          f"put all softmax mass (scale 100) on a wrong match, loss {loss:.4g}, grad_norm "
          f"{grad_norm:.3g}, so the run learns nothing and retrieval stays at chance. Likely "
          "causes: an unnormalised header output (seqTransf from scratch: set "
          "--config.model.renormalize_after_header=True), a learning rate too high, features "
          "collapsed to one vector (check the data); --config.saturation_policy=stop ends such "
          "runs, =off silences this")


class SaturationGuard:
  """Watches the `saturated` metric at log steps and reports a saturated window once."""

  def __init__(self, window: int, policy: str = "warn"):
    """Args: window: steps a saturated stretch must span; policy: 'warn', 'stop' or 'off'."""
    if policy not in POLICIES:
      raise ValueError(f"saturation_policy={policy!r}: use one of {POLICIES}")
    if window < 1:
      raise ValueError(f"saturation_window={window}: must be >= 1 step")
    self.window, self.policy = int(window), policy
    self._first: int | None = None   # first log step of the current saturated stretch
    self._reported = False

  def check(self, step: int, metrics: Mapping[str, float]) -> str | None:
    """Feeds one log step (1-based steps done, host metrics); returns the line when it fires.

    Fires once per saturated stretch, when it spans >= `window` steps; a healthy log step ends
    the stretch (and re-arms the guard).
    """
    if self.policy == "off" or "saturated" not in metrics:
      return None
    if metrics["saturated"] < THRESHOLD:
      self._first, self._reported = None, False
      return None
    if self._first is None:
      self._first = step
    if self._reported or step - self._first + 1 < self.window:
      return None
    self._reported = True
    line = message(self._first, step, metrics["saturated"], metrics.get("loss", float("nan")),
                   metrics.get("grad_norm", float("nan")))
    reporting.say(line)
    if self.policy == "stop":
      raise TrainingSaturatedError(line)
    return line
