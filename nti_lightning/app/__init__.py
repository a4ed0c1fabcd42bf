"""`nti app`: an editor in the browser that inverts a photo once and edits it live.

The logic is plain Python over the package's API, usable without a browser:
`cache.InversionCache` (inversions on disk, keyed by what made them), `requests` (the page's
fields, checked), `editor.Editor` (the one model, its lock, invert/edit). `layout.Page` is the
Gradio page over an `Editor`, and `cli` the `nti app` command; only those two need Gradio
(`pip install -e ".[app]"`).
"""

from nti_lightning.app.cache import CachedInversion, InversionCache
from nti_lightning.app.editor import Cancelled, Editor, EditResult, InversionResult
from nti_lightning.app.requests import AppInputError, EditRequest, InversionSettings

__all__ = [
    "AppInputError",
    "CachedInversion",
    "Cancelled",
    "EditRequest",
    "EditResult",
    "Editor",
    "InversionCache",
    "InversionResult",
    "InversionSettings",
]
