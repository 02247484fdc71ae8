"""Fail fast when a Hugging Face Hub model is neither in the local cache nor reachable.

Why: huggingface_hub retries a file it cannot fetch and has not cached five times with backoff (about 25 s), and
open_clip asks for a file under two names in turn, so with no network an uncached `hf-hub:` model (the
`biomedclip` alias on a fresh machine) took half a minute to reach its error. Here the cache is looked up first
(no network), then, unless HF_HUB_OFFLINE is set, one request without retries decides whether the Hub answers.
"""

from __future__ import annotations

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError


class HubUnavailableError(FileNotFoundError):
    """A hub model that is not in the local cache, while the Hub is off (HF_HUB_OFFLINE=1) or unreachable."""


class GatedModelError(PermissionError):
    """A gated hub model (MedSigLIP, ConceptCLIP) whose terms this account has not accepted, or no token given."""


def is_cached(repo_id: str, filename: str) -> bool:
    """Whether `filename` of `repo_id` is in the Hugging Face cache (no network)."""
    return isinstance(huggingface_hub.try_to_load_from_cache(repo_id, filename), str)


def require_hub_file(repo_id: str, filenames: tuple[str, ...]) -> None:
    """Return when one of `filenames` of `repo_id` is cached or the Hub answers; else HubUnavailableError.

    The message names the repo; the caller names the SPEC. A gated repo the account may not read raises
    GatedModelError saying what to do (transformers' own message spans lines and buries that). A malformed id or
    another HTTP error from the Hub (a missing repo) returns: the loader then reports that error itself, at once.
    """
    try:
        if any(is_cached(repo_id, f) for f in filenames):
            return
    except HFValidationError:  # a malformed id: the loader names it
        return
    # huggingface_hub's functions and settings are looked up at each call (HF_HUB_OFFLINE, HF_HUB_CACHE can change)
    if huggingface_hub.is_offline_mode():
        raise HubUnavailableError(
            f"{repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"(looked for {' or '.join(filenames)})"
        )
    try:  # a single HEAD request: huggingface_hub retries only when asked to
        huggingface_hub.get_hf_file_metadata(
            huggingface_hub.hf_hub_url(repo_id, filenames[0]), timeout=constants.HF_HUB_ETAG_TIMEOUT
        )
    except GatedRepoError as e:
        raise GatedModelError(
            f"{repo_id} is gated on the Hugging Face Hub: accept its terms on "
            f"https://huggingface.co/{repo_id} with your account, then log in (`hf auth login`, "
            "or set HF_TOKEN) and retry"
        ) from e
    except HfHubHTTPError:  # the Hub answered (missing repo): the loader names the error
        return
    except Exception as e:  # DNS, connection, TLS, timeout: the Hub did not answer
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HubUnavailableError(
            f"the Hugging Face Hub cannot be reached ({type(e).__name__}: {first}) "
            f"and {repo_id} is not in the local cache ({constants.HF_HUB_CACHE}); connect to the "
            "network and retry, or give a local folder (local-dir:PATH, hf-clip:PATH)"
        ) from e
