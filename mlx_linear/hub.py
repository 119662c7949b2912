"""Files from the Hugging Face hub (huggingface_hub: HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE apply),
and hub errors as one line that keeps what went wrong."""

from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


def download_error(what: str, error: Exception, fix: str) -> UserError:
    """Offline with nothing cached, missing upstream, or another failure: each said as such."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    if isinstance(error, LocalEntryNotFoundError):
        reason = "not in the Hugging Face cache, and the hub cannot be reached (offline?)"
    elif isinstance(error, GatedRepoError):
        reason = "gated: accept its terms on the hub and log in (`hf auth login`)"
    elif isinstance(error, (RepositoryNotFoundError, EntryNotFoundError)):
        reason = "not found on the hub"
    else:
        reason = f"download failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    return UserError(f"{what}: {reason}: {fix}")


@dataclass(frozen=True)
class HubFile:
    """One file of a hub dataset, downloaded once into the HF cache and read from there after."""

    repo: str
    filename: str
    revision: str | None = None  # None: main

    def __str__(self):
        at = f"@{self.revision}" if self.revision else ""
        return f"{self.repo}{at}/{self.filename}"

    def download(self, what: str, fix: str) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return Path(hf_hub_download(self.repo, self.filename, repo_type="dataset", revision=self.revision))
        except (OSError, EntryNotFoundError) as e:  # network and hub errors; a bug in our code stays a traceback
            raise download_error(f"{what} ({self})", e, fix) from e
