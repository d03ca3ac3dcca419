"""What POST /feedback keeps (pipeline/serving/api.py has the route): a person's correction of an
answer, in a review folder (pipeline/serving/review.py) for `digits finetune DIR`. Off unless
`digits serve --feedback DIR`: the route answers 404 then.

A correction is an image (multipart field `file`, or JSON `pixels` as /predict and /read take them)
with the person's `label`: a digit, a number for a number read by /read (`kind` number), or "-" for
no digit; optionally the `shown` answer and a `visit` id (the page sends one per page load, so that
fine-tuning holds out whole visits). The server decodes the image and writes it as a PNG under a
name of its own; the row follows once the image is whole, and the answer (201) once the row is on
disk. Bounded: the body's size (limits.BODY_LIMITS), items per minute per client (429) and items in
the folder (429 once full).
"""

import numpy as np
from fastapi import HTTPException

from pipeline.core import normalize
from pipeline.serving import review

PER_MINUTE = 60  # items one client may send in a minute
QUOTA = 10_000  # items the folder may hold
LABEL = r"^(-|[0-9]{1,20})$"  # a digit, a number, or "-" for none
SHOWN = r"^[0-9?]{0,40}$"  # the answer the person was shown
VISIT = r"^[A-Za-z0-9_-]{1,64}$"  # a page visit's id


class Feedback:
    def __init__(self, folder, model, per_minute=PER_MINUTE, quota=QUOTA):
        from limits import parse, storage, strategies

        self.queue = review.ReviewQueue(folder, model)
        self.rate, self.quota = parse(f"{per_minute}/minute"), quota
        self.limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())

    def admit(self, client):
        """429 when this client has sent its share for the minute."""
        if not self.limiter.hit(self.rate, client):
            raise HTTPException(429, f"at most {self.rate.amount} corrections a minute from one client")

    def keep(self, image, correction, client):
        """Write the image (a PIL image or an array of grey levels) as a PNG, and its row; returns the
        file's name. 422 for an image without ink or a label the review folder cannot use (a number
        for a digit); 429 once the folder is full."""
        from PIL import Image

        problem = review.label_problem({"label": correction.label, "kind": correction.kind})
        if problem:
            raise HTTPException(422, problem)
        try:
            gray = normalize.to_gray(image)
            normalize.to_ink(gray)  # refuses a blank image
        except normalize.ImageError as e:
            raise HTTPException(422, str(e)) from None
        row = {
            "label": correction.label,
            "answer": correction.shown,
            "confidence": "",
            "reason": "feedback",
            "kind": correction.kind,
            "group": correction.visit or client,
            "source": "POST /feedback",
        }
        png = Image.fromarray((gray * 255).round().astype(np.uint8))
        try:
            path = self.queue.store(lambda path: png.save(path, format="PNG"), ".png", row, most=self.quota)
        except review.QueueFull as e:
            raise HTTPException(429, str(e)) from None
        return path.relative_to(self.queue.folder).as_posix()


ENVIRONMENT = ("DIGITS_FEEDBACK", "DIGITS_FEEDBACK_PER_MINUTE", "DIGITS_FEEDBACK_QUOTA")


def to_environment(folder, per_minute, quota):
    """For worker processes (`digits serve --workers N`): what from_environment reads back. A folder
    that cannot be a review folder is named here, before any worker starts."""
    import os

    if folder is not None:
        review.ReviewQueue(folder, "")
        os.environ.update(zip(ENVIRONMENT, (str(folder), str(per_minute), str(quota)), strict=True))


def from_environment(model):
    """The Feedback that to_environment described, or None (feedback off)."""
    import os

    folder = os.environ.get(ENVIRONMENT[0])
    if not folder:
        return None
    return Feedback(folder, model, int(os.environ[ENVIRONMENT[1]]), int(os.environ[ENVIRONMENT[2]]))
