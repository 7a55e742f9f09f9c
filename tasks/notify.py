"""Notifications through a Prefect Webhook block (Slack, Teams, any HTTP endpoint).

The block holds the URL and any secret headers, so nothing sensitive sits in
params.yaml; ``retrain.notify_webhook_block`` only names it. A notification that
cannot be delivered is logged, never allowed to fail the run it reports on.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import task


def send_webhook(block_name: str, payload: dict[str, Any]) -> bool:
    from prefect.blocks.webhook import Webhook
    from prefect.utilities.asyncutils import run_coro_as_sync

    block = Webhook.load(block_name)
    response = run_coro_as_sync(block.call(payload))
    response.raise_for_status()
    return True


def notify_quietly(block_name: str | None, payload: dict[str, Any]) -> bool:
    """Send if a block is configured; a delivery problem is logged, never raised."""
    if not block_name:
        return False
    try:
        return send_webhook(block_name, payload)
    except Exception as error:  # reporting must not turn a good run into a failed one
        logging.getLogger("roadshift.notify").warning(
            "notification via webhook block %r failed: %s", block_name, error
        )
        return False


@task(name="notify")
def notify(block_name: str | None, payload: dict[str, Any]) -> bool:
    return notify_quietly(block_name, payload)
