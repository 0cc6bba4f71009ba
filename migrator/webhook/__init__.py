"""MLflow webhook deliveries: verified events only ask the daemon for an early poll.

:mod:`migrator.webhook.signing` checks deliveries as MLflow signs them and remembers their ids;
:mod:`migrator.webhook.receiver` serves them (starlette on uvicorn) within hard limits.
"""

from migrator.webhook.receiver import WebhookReceiver
from migrator.webhook.signing import (
    RELEVANT_EVENTS,
    DeliveryStore,
    MemoryDeliveries,
    WebhookLimits,
    database_deliveries,
    sign,
    verify_signature,
)

__all__ = [
    "RELEVANT_EVENTS",
    "DeliveryStore",
    "MemoryDeliveries",
    "WebhookLimits",
    "WebhookReceiver",
    "database_deliveries",
    "sign",
    "verify_signature",
]
