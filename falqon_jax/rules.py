"""FALQON's update rules as data: the one table every layer asks what a rule does.

A rule decides where the optimizer's update of a melded layer's ``b`` goes
(:func:`falqon_jax.optax.falqon_update` carries it out):

=================  =======  ===============  ==========================================
rule               live_b   merges_into_w8   what happens to ``b``'s update
=================  =======  ===============  ==========================================
``visible``        yes      no               applied to ``b``, a live adapter (default)
``visible_merge``  yes      yes              as ``visible``, then ``b``'s top-k rows are
                                             folded into ``w8`` where a full FP8 step
``paper``          no       yes              a float32 proxy buffer; its top-k rows
                                             merged into ``w8``, then cleared
``reference``      no       yes              ``paper`` with ``k = rank`` and the whole
                                             buffer cleared (the authors' code)
=================  =======  ===============  ==========================================

The command line, the model's layers (``b_in_forward``), the train step, checkpoints (which
parts change) and the benchmarks read these fields; no other list of rule names exists.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Rule:
    """One update rule.

    Fields:
      name: as ``--rule`` and ``falqon_update(rule=...)`` spell it.
      live_b: layers add ``(A x) b^T`` in the forward pass
        (:attr:`~falqon_jax.melded.MeldedLinear.b_in_forward`); otherwise ``b`` stays zero
        and updates accumulate in a proxy buffer.
      merges_into_w8: training writes merged rows into the FP8 weights ``w8``.
      k_is_rank: merges ``rank`` rows per matrix, whatever ``top_k`` says.
      clears_all: clears the whole proxy buffer after a merge, whatever ``reset`` says.
      summary: one line for ``--help``.
    """

    name: str
    live_b: bool
    merges_into_w8: bool
    summary: str
    k_is_rank: bool = False
    clears_all: bool = False

    @property
    def uses_top_k(self) -> bool:
        """``top_k`` (``--top-k``) sets how many rows it merges per matrix per step."""
        return self.merges_into_w8 and not self.k_is_rank

    @property
    def proxy_buffer(self) -> bool:
        """Updates accumulate in a float32 buffer per melded matrix (``b`` is not live)."""
        return not self.live_b


VISIBLE = Rule("visible", live_b=True, merges_into_w8=False,
               summary="b is a live adapter, nothing rounds away")
VISIBLE_MERGE = Rule("visible_merge", live_b=True, merges_into_w8=True,
                     summary="live b, its top-k rows folded into the FP8 weights")
PAPER = Rule("paper", live_b=False, merges_into_w8=True,
             summary="proxy buffer, top-k merges")
REFERENCE = Rule("reference", live_b=False, merges_into_w8=True, k_is_rank=True,
                 clears_all=True, summary="the authors' code: k = rank, whole buffer cleared")

RULES: dict[str, Rule] = {rule.name: rule for rule in (VISIBLE, VISIBLE_MERGE, PAPER, REFERENCE)}
DEFAULT_RULE = VISIBLE.name
ROUNDINGS = ("nearest", "stochastic", "feedback")
RESETS = ("merged", "all")


def get(rule: str | Rule) -> Rule:
    """The :class:`Rule` called ``rule`` (a ``Rule`` passes through); ``ValueError`` listing
    the names otherwise."""
    if isinstance(rule, Rule):
        return rule
    try:
        return RULES[rule]
    except (KeyError, TypeError):
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}") from None


def check_rounding(rounding: str) -> str:
    """``rounding`` if it is one of :data:`ROUNDINGS`; ``ValueError`` otherwise."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    return rounding


def check_reset(reset: str) -> str:
    """``reset`` if it is one of :data:`RESETS`; ``ValueError`` otherwise."""
    if reset not in RESETS:
        raise ValueError(f'reset must be "merged" or "all", got {reset!r}')
    return reset
