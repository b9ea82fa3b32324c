"""Authenticating a job: the join secret and its derived keys (:mod:`comms.security.token`).

With COMMS_AUTH_TOKEN or COMMS_AUTH_TOKEN_FILE set, every value comms puts in the store carries an
HMAC tag, and every data-plane connection is a mutual challenge-response over the secret; without
either, comms behaves as it always did. See README.md, "An authenticated job".
"""
from .token import authenticated, derive, job_secret

__all__ = ["authenticated", "derive", "job_secret"]
