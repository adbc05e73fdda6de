"""What a remote worker holds (cloudkon/holdings.py): a message SQS delivers again while its bundle
runs on this worker (its visibility ran out with the lease, AWS being away or the worker paused) is
known, so the bundle does not run twice here; the newest receipt is the one kept, for the lease thread
and the delete (SQS deletes a message received again by its newest receipt only)."""

from cloudkon.holdings import Holdings, Running


def _message(receipt: str) -> dict[str, str]:
    return {"MessageId": "m-1", "ReceiptHandle": receipt, "Body": "{}"}


def test_a_message_delivered_again_while_its_bundle_runs_here_is_not_handled_again():
    held = Holdings(sqs=None, request_url="", claims=None, visibility_timeout=3)
    first, again = _message("receipt-1"), _message("receipt-2")
    assert held.receive(first)
    bundle = object()
    held.start(first, bundle, Running("job", "job:1:0", "reply"))
    assert not held.receive(again)  # the pool is not given it: the first run goes on alone
    assert held.leave("drain") == [("receipt-2", "job:1:0")]  # its lease is still kept, by the new receipt
    assert held.receipt(first) == "receipt-2"  # what the delete uses
    held.end(bundle)
    held.done_with(first)
    assert held.leave("drain") == [("receipt-2", "")]
    held.drop(first)
    assert held.count() == 0 and held.receive(_message("receipt-3"))  # gone from here: handled anew


def test_a_second_message_of_a_bundle_running_here_is_known_by_its_claim():
    held = Holdings(sqs=None, request_url="", claims=None, visibility_timeout=3)
    first, resent = _message("receipt-1"), {"MessageId": "m-2", "ReceiptHandle": "receipt-9", "Body": "{}"}
    bundle = object()
    assert held.receive(first) and held.receive(resent)  # another message: handled, and then...
    held.start(first, bundle, Running("job", "job:1:0", "reply"))
    assert held.runs_claim("job:1:0") and not held.runs_claim("job:2:0")  # ...not run a second time here
    held.end(bundle)
    assert not held.runs_claim("job:1:0")
