"""POST /v1/feedback: a client rates one of its completions by the id it got back.

    {"id": "cmpl-...", "rating": -1 | 1}                      thumbs (the default scale)
    {"id": "chatcmpl-...", "rating": 1..5, "scale": "stars"}  stars; 1-2 count as negative
    optional "comment" (at most 2,000 characters); "request_id" is accepted for "id"

Stored in the usage database's `feedback` table beside the request rows; the monitor reads the negative share and
the retrain loop leaves negatively rated answers out of its training data. A key can rate only completions it was
given itself (anything else is 404, so ids of other keys' requests are not confirmed).
"""
from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from pydantic import Field

from lifecycle.serve.limits import ApiError
from lifecycle.serve.openai_api import _Body, parse
from lifecycle.serve.usage import UnknownRequest

SCALES = {"thumbs": (-1, 1), "stars": (1, 2, 3, 4, 5)}
NEGATIVE = {"thumbs": {-1}, "stars": {1, 2}}


class FeedbackBody(_Body):
    id: str | None = Field(default=None, max_length=64)
    request_id: str | None = Field(default=None, max_length=64)
    rating: int
    scale: str = "thumbs"
    comment: str | None = Field(default=None, max_length=2000)


def add_feedback_route(app: FastAPI, ctx) -> None:
    """Register POST /v1/feedback on `app` (behind the same key gate as every other route)."""

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        body = parse(await request.body(), FeedbackBody)
        if not (body.id or body.request_id):
            raise ApiError(400, "give the completion's id (the `id` field of its response)", param="id")
        if body.scale not in SCALES:
            raise ApiError(400, f"scale {body.scale!r}: use one of {', '.join(SCALES)}", param="scale")
        if body.rating not in SCALES[body.scale]:
            raise ApiError(400, f"rating {body.rating} is not on the {body.scale} scale {SCALES[body.scale]}",
                           param="rating")
        if ctx.meter is None:
            raise ApiError(503, "feedback needs the usage database, which this server does not keep",
                           code="no_usage_db")
        rid = body.id or body.request_id
        try:
            row = await asyncio.to_thread(ctx.meter.record_feedback, rid, request.scope["state"]["key_id"],
                                          body.rating, body.scale, body.rating in NEGATIVE[body.scale], body.comment)
        except UnknownRequest as e:
            raise ApiError(404, str(e), param="id", code="request_not_found") from None
        return {"object": "feedback", "id": row, "request_id": rid, "rating": body.rating, "scale": body.scale}
