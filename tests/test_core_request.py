"""Request runtime state and the waiting queue's order."""

from zomni.core.request import Request, RequestStatus
from zomni.core.request_queue import RequestQueue
from zomni.proto import EngineRequest, FinishReason, SamplingParams


def _wire(max_tokens, prompt_len=10, **kw) -> EngineRequest:
    return EngineRequest(request_id="r", prompt_token_ids=list(range(prompt_len)),
                         sampling=SamplingParams(max_tokens=max_tokens), **kw)


def test_from_engine_request_resolves_max_tokens():
    assert Request.from_engine_request(_wire(16), b"c", 64).max_tokens == 16
    assert Request.from_engine_request(_wire(100), b"c", 64).max_tokens == 54
    assert Request.from_engine_request(_wire(None), b"c", 64).max_tokens == 54


def test_request_fields_and_properties():
    req = Request.from_engine_request(_wire(4, priority=3, arrival_time=5.0), b"cli", 64)
    assert (req.request_id, req.client_id, req.priority, req.arrival_time) == ("r", b"cli", 3, 5.0)
    assert req.status == RequestStatus.WAITING and not req.is_finished
    req.output_token_ids += [7, 8]
    assert req.all_token_ids == list(range(10)) + [7, 8]
    assert (req.num_tokens, req.num_prompt_tokens, req.num_output_tokens) == (12, 10, 2)
    assert Request.from_engine_request(_wire(4), b"c", 64).arrival_time > 0  # unset -> now
    for status, reason in [(RequestStatus.FINISHED_STOPPED, FinishReason.STOP),
                           (RequestStatus.FINISHED_LENGTH, FinishReason.LENGTH),
                           (RequestStatus.FINISHED_ABORTED, FinishReason.ABORT),
                           (RequestStatus.FINISHED_ERROR, FinishReason.ERROR)]:
        req.status = status
        assert req.is_finished and req.finish_reason == reason
    for status in (RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.PREEMPTED):
        req.status = status
        assert not req.is_finished and req.finish_reason is None


def _req(rid: str, priority: int, arrival: float) -> Request:
    return Request(request_id=rid, client_id=b"c", prompt_token_ids=[1], sampling=SamplingParams(),
                   max_tokens=1, priority=priority, arrival_time=arrival)


def test_request_queue_order_and_remove():
    q = RequestQueue()
    reqs = [_req("late", 0, 3.0), _req("low", 5, 0.0), _req("early", 0, 1.0),
            _req("tie", 0, 3.0)]
    for r in reqs:
        q.push(r)
    assert [r.request_id for r in q] == ["early", "late", "tie", "low"]
    assert q.remove(reqs[0]) and not q.remove(reqs[0])
    assert q.peek().request_id == "early"
    assert [q.pop().request_id for _ in range(len(q))] == ["early", "tie", "low"]
    assert not q
