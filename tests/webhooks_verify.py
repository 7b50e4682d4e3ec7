"""Verifies recorded webhook requests with the standardwebhooks package (PyPI), an
implementation independent of flashgate's: tests/api/webhooks.rs writes the requests
its receiver got as JSON ([{"headers": {...}, "body": "..."}]) and runs

    python webhooks_verify.py SECRET FILE

Prints one line per request ("ok <webhook-id>" or "bad <webhook-id> <why>"); exit 1 if
any request does not verify."""

import json
import sys

from standardwebhooks.webhooks import Webhook


def main() -> int:
    secret, path = sys.argv[1], sys.argv[2]
    hook = Webhook(secret)
    bad = 0
    with open(path, encoding="utf-8") as f:
        requests = json.load(f)
    for request in requests:
        headers = request["headers"]
        try:
            payload = hook.verify(request["body"], headers)
            # The payload must be the event the id names.
            if payload.get("id") != headers.get("webhook-id"):
                raise ValueError("webhook-id is not the event's id")
            print("ok", headers.get("webhook-id"))
        except Exception as e:  # noqa: BLE001 - report every failure
            bad += 1
            print("bad", headers.get("webhook-id"), repr(e))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
