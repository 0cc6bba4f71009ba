"""MLflow webhook deliveries: verified events ask the daemon for an early poll (and a tag
delivery marks its version for that pass).

:mod:`migrator.webhook.signing` checks deliveries as MLflow signs them and remembers their ids;
:mod:`migrator.webhook.receiver` serves them (starlette on uvicorn) within hard limits.
"""

from migrator.webhook.receiver import WebhookReceiver
from migrator.webhook.signing import (
    MARKED_EVENTS,
    RELEVANT_EVENTS,
    DeliveryStore,
    MarkStore,
    MemoryDeliveries,
    WebhookLimits,
    database_deliveries,
    database_marks,
    sign,
    verify_signature,
)

__all__ = [
    "MARKED_EVENTS",
    "RELEVANT_EVENTS",
    "DeliveryStore",
    "MarkStore",
    "MemoryDeliveries",
    "WebhookLimits",
    "WebhookReceiver",
    "database_deliveries",
    "database_marks",
    "sign",
    "verify_signature",
]
