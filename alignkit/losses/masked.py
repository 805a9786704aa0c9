"""Token-masked pair losses: the sums of log-probs run over a subset of completion tokens."""

from __future__ import annotations

from alignkit.losses.dpo import dpo
from alignkit.losses.registry import register


@register(
    "mask_dpo",
    summary="Mask-DPO: DPO over the chosen's correct sentences and the rejected's incorrect ones.",
    citation="Gu et al., Mask-DPO: Generalizable Fine-grained Factuality Alignment of LLMs, arXiv 2503.02846",
    data="masked",
)
def mask_dpo(
    policy_chosen_masked_logps,
    policy_rejected_masked_logps,
    ref_chosen_masked_logps,
    ref_rejected_masked_logps,
    *,
    beta: float = 0.1,
):
    """loss = -log sigmoid(beta * h_mask), where h_mask is the DPO margin h computed from sums over
    masked tokens only (Mask-DPO, arXiv 2503.02846): in the chosen response, the tokens of sentences
    labelled factually correct; in the rejected response, the tokens of sentences labelled
    incorrect. So DPO neither rewards the hallucinations of a preferred answer nor penalises the
    true statements of a dispreferred one.

    As a pure function this is `dpo` on masked sums. Inputs the recipe must compute ([B]):
      policy_chosen_masked_logps   = sum_t m_w[t] * log pi(y_w[t] | x, y_w[<t]),  m_w[t] = 1 on tokens
                                     of correct sentences of y_w, 0 elsewhere
      policy_rejected_masked_logps = sum_t m_l[t] * log pi(y_l[t] | ...),  m_l[t] = 1 on tokens of
                                     incorrect sentences of y_l
      ref_chosen_masked_logps, ref_rejected_masked_logps: the same masked sums under the reference.
    Both models use the same masks. A response with an empty mask contributes 0 to h (then only the
    other response is trained on); sentence labels come from the data (the paper annotates them
    with the ANAH-v2 hallucination annotator)."""
    return dpo(
        policy_chosen_masked_logps,
        policy_rejected_masked_logps,
        ref_chosen_masked_logps,
        ref_rejected_masked_logps,
        beta=beta,
    )
