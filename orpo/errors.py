"""Errors a user can act on, and the reasons a preference pair is dropped.

Every error the CLI reports is an `OrpoError`: its message is one line naming the file, the
row and the problem, and the CLI prints it without a traceback.
"""


class OrpoError(Exception):
    """A problem with the user's input or setup, reported as one line (no traceback)."""


class UntrustedCode(OrpoError, ValueError):
    """A model or tokenizer that ships its own Python code, loaded without trust_remote_code: one line, and a
    ValueError, as transformers' (and TRL's) refusal is, so code that catches that keeps working."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name where it has none): what a one-line error quotes
    of a library's error."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class DroppedPair(Exception):
    """Raised for a pair that cannot be trained on; `reason` is one of `DROP_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in DROP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


TOO_LONG = "too long"
SAME_RESPONSES = "chosen == rejected"
SAME_AFTER_TRUNCATION = "chosen == rejected as tokens"  # after tokenization and truncation
EMPTY_RESPONSE = "empty response"
WRONG_TYPES = "wrong types"
UNKNOWN_ROLE = "unknown role"
NON_TEXT = "non-text content"
TEMPLATE_ERROR = "chat template error"
LABEL_TIE = "tie"
LABEL_MISSING = "missing label"
LABEL_UNMAPPED = "unmapped label"
TIED_RATINGS = "tied ratings"
IMAGE_COUNT = "images do not match the prompt"  # image placeholders in the prompt vs images in the row
UNREADABLE_IMAGE = "unreadable image"  # a missing file, bytes that are no image
TEXT_ONLY_MODEL = "images for a text-only model"  # prepare_dataset turns it into one OrpoError line
DROP_REASONS = (TOO_LONG, SAME_RESPONSES, SAME_AFTER_TRUNCATION, EMPTY_RESPONSE, WRONG_TYPES, UNKNOWN_ROLE,
                NON_TEXT, TEMPLATE_ERROR, LABEL_TIE, LABEL_MISSING, LABEL_UNMAPPED, TIED_RATINGS, IMAGE_COUNT,
                UNREADABLE_IMAGE, TEXT_ONLY_MODEL)
