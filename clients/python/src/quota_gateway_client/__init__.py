"""Client of the quota gateway: ``Client`` (sync, urllib3) and ``AsyncClient`` (aiohttp).

    from quota_gateway_client import Client, InsufficientQuota

    with Client("http://127.0.0.1:8001", key) as quota:
        result = quota.debit("user-1", "chat_tokens", 12, ref="msg-7f2e4b")
        print(result.remaining)  # a Decimal

Every call is retried on network failures and 502/503/504 with the same ``ref`` (made up
when not given), and a duplicate ref is returned as the original result: a retry never
debits twice. See README.md.
"""

from quota_gateway_client._core import NO_RETRY, RetryPolicy
from quota_gateway_client.aio import AsyncClient, AsyncHold
from quota_gateway_client.errors import (
    Conflict,
    ConnectionFailed,
    Forbidden,
    HoldExpired,
    HoldReleased,
    HoldSettled,
    InsufficientQuota,
    InvalidInput,
    NotFound,
    QuotaGatewayError,
    ServerError,
    Unauthorized,
    Unavailable,
)
from quota_gateway_client.models import (
    Balance,
    BalanceCheck,
    BalanceDebitResult,
    CreditResult,
    DebitResult,
    ExtendResult,
    Meter,
    PlanState,
    QuotaCheck,
    ReleaseResult,
    Reservation,
    SettleResult,
    Transaction,
    TransactionsPage,
)
from quota_gateway_client.sync import Client, Hold
from quota_gateway_client.transports import (
    AiohttpTransport,
    AsyncTransport,
    SyncTransport,
    TransportFailure,
    Urllib3Transport,
)

__version__ = "0.1.0"

__all__ = [
    "NO_RETRY",
    "AiohttpTransport",
    "AsyncClient",
    "AsyncHold",
    "AsyncTransport",
    "Balance",
    "BalanceCheck",
    "BalanceDebitResult",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "CreditResult",
    "DebitResult",
    "ExtendResult",
    "Forbidden",
    "Hold",
    "HoldExpired",
    "HoldReleased",
    "HoldSettled",
    "InsufficientQuota",
    "InvalidInput",
    "Meter",
    "NotFound",
    "PlanState",
    "QuotaCheck",
    "QuotaGatewayError",
    "ReleaseResult",
    "Reservation",
    "RetryPolicy",
    "ServerError",
    "SettleResult",
    "SyncTransport",
    "Transaction",
    "TransactionsPage",
    "TransportFailure",
    "Unauthorized",
    "Unavailable",
    "Urllib3Transport",
]
