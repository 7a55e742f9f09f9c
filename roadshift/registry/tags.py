"""Names the registry writes: the aliases, the gate metric and every promotion tag.

Constants only, so a module that needs one name (the ``champion`` alias, a tag key) imports
nothing heavy for it.
"""

from __future__ import annotations

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous-champion"
GATE_METRIC = "target_macro_f1"
# A champion score on today's test set handed in with the metrics; used only when the
# champion itself is not scored here (no evaluation set), ahead of its stored tags.
CHAMPION_GATE_METRIC = f"champion_{GATE_METRIC}"
# The challenger's own run's baselines (metrics/evaluate.json keys) the baseline gates read.
SOURCE_ONLY_GATE_METRIC = "source_only_target_macro_f1"
SCRATCH_GATE_METRIC = "scratch_target_macro_f1"
SOURCE_ONLY_SOURCE_ACCURACY = "source_only_source_accuracy"
FINETUNED_SOURCE_ACCURACY = "finetuned_source_accuracy"
METRIC_TAG_PREFIX = "metrics."
RECALL_TAG_PREFIX = "metrics.recall."

# The latest decision on a version (registration, promote --version, promote --force).
DECISION_TAG = "promotion.decision"  # promoted | refused | forced
REASON_TAG = "promotion.reason"  # every gate's reason, "; "-joined
MODE_TAG = "promotion.mode"  # pipeline | manual | forced
BY_TAG = "promotion.by"
AT_TAG = "promotion.at"  # UTC ISO time, microseconds: orders decisions
WHY_TAG = "promotion.why"  # the operator's --reason
# .floor / .beats_scratch / .beats_source_only / .source_accuracy_drop / .margin /
# .class_recall = "pass|fail|skipped: ..."; only the gates of the latest decision
GATE_TAG_PREFIX = "promotion.gate."
AGAINST_TAG = "promotion.champion_version"  # the champion decided against, re-read in the lock
REPLACED_TAG = "promotion.replaced"  # the champion this version replaced: rollback's history
# The champion's scores the decision used, and where they came from.
CHAMPION_SCORE_TAG = CHAMPION_GATE_METRIC
CHAMPION_RECALL_TAG_PREFIX = "champion_recall."
CHAMPION_SCORES_FROM_TAG = "champion_scores_from"
# On the champion that was challenged.
CHALLENGED_BY_TAG_PREFIX = "promotion.challenged_by."  # + challenger version
LAST_CHALLENGE_TAG = "promotion.last_challenge"
# Rollback, on both ends.
ROLLED_BACK_TAG = "rolled_back"  # on the version rolled back from; kept for good
RESTORED_TAG = "restored"  # on the version rolled back to

# What registration records about the logged model, and the names of its files.
WEIGHTS_TAG = "weights.sha256"  # of weights.safetensors; the loader checks it before loading
MODEL_DIR_ARTIFACT = "model_dir"  # the pyfunc artifact holding weights + model.json
MODEL_CODE_FILE_NAME = "model_code.py"  # the models-from-code file (roadshift/registry/)
WEIGHTS_FILE_NAME = "weights.safetensors"

# The values of DECISION_TAG.
PROMOTED, REFUSED, FORCED = "promoted", "refused", "forced"
