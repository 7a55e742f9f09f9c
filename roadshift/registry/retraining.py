"""Whether a scheduled run has anything to retrain: compare now with the champion's lineage.

The champion records the DVC data version of each domain and the params hash it was
trained with. If the data and params in the checkout are the same, retraining would
rebuild the same model (DVC would skip every stage anyway), so the scheduled run
stops early and says so. Anything new goes through the whole pipeline, where DVC
skips what did not change (source pretraining when only target data moved) and the
registry's gates decide on promotion.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from roadshift.config import DOMAINS, UNLABELED_POOL


@dataclass(frozen=True)
class RetrainDecision:
    retrain: bool
    reason: str
    changes: list[str] = field(default_factory=list)


def retrain_decision(
    champion_tags: Mapping[str, str] | None,
    champion_label: str | None,
    data_versions: Mapping[str, str],
    current_params_hash: str,
) -> RetrainDecision:
    """Retrain when there is no champion, or its data versions or params differ from now."""
    if champion_tags is None:
        return RetrainDecision(True, "no champion yet: train the first one", ["no champion"])
    changes = [
        f"{domain} data {champion_tags.get(f'data.{domain}.version', 'unknown')} -> "
        f"{data_versions.get(domain, 'unknown')}"
        # the unlabelled pool too: new unlabelled images are new data for self-training
        for domain in (*DOMAINS, UNLABELED_POOL)
        if champion_tags.get(f"data.{domain}.version") != data_versions.get(domain)
    ]
    if champion_tags.get("params.hash") != current_params_hash:
        changes.append("params changed since the champion was trained")
    if not changes:
        return RetrainDecision(
            False,
            f"nothing to retrain: champion {champion_label} was trained on these data versions "
            f"({', '.join(f'{d} {data_versions.get(d)}' for d in DOMAINS)}) and these params",
        )
    return RetrainDecision(
        True, f"new since champion {champion_label}: " + "; ".join(changes), changes
    )
