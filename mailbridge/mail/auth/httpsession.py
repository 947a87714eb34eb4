"""The HTTP session the OAuth2 libraries (msal, google-auth) talk to identity providers with.

In a module of its own so that ``requests`` (with urllib3, ~0.1 s to import) is loaded only for
OAuth2 accounts, not by every daemon and command at start-up (found by py-spy, issue 10).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import requests


class CaSession(requests.Session):
    """A requests session that trusts exactly ``ca_file`` when one is configured.

    requests lets ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` override ``Session.verify``; with
    ``auth.ca_file`` the file must win, while proxies from the environment still apply.
    """

    def __init__(self, ca_file: Path | None) -> None:
        super().__init__()
        self._ca_file = str(ca_file) if ca_file is not None else None
        if self._ca_file is not None:
            self.verify = self._ca_file

    def merge_environment_settings(
        self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any
    ) -> dict[str, Any]:
        settings: dict[str, Any] = super().merge_environment_settings(
            url, proxies, stream, verify, cert
        )
        if self._ca_file is not None:
            settings["verify"] = self._ca_file
        return settings
