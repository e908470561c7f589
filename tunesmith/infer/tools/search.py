"""Web search through Serper (https://serper.dev), the Google search API XTuner's agent and plugins use.

The key comes from `SERPER_API_KEY`; the endpoint from `SERPER_BASE_URL` (default https://google.serper.dev),
which tests point at a local fake server. Network failures become a `ToolError` (the agent shows it to the
model and carries on); a missing key is a `TunesmithError` before the chat starts.
"""

from __future__ import annotations

import os

from tunesmith.errors import TunesmithError
from tunesmith.infer.tools.base import ToolError, strip_quotes

DEFAULT_BASE_URL = "https://google.serper.dev"
KEY_HINT = "get a free key at https://serper.dev (sign up, then 'API key'), then: export SERPER_API_KEY=<your key>"


def serper_key(required: bool = True) -> str | None:
    key = os.environ.get("SERPER_API_KEY", "").strip()
    if not key and required:
        raise TunesmithError("web search needs a Serper API key and SERPER_API_KEY is not set", KEY_HINT)
    return key or None


class WebSearch:
    name = "search"
    description = "Web search: looks up current facts on Google and returns the top results."
    example = "population of Shanghai 2023"

    def __init__(
        self, api_key: str | None = None, *, base_url: str | None = None, timeout: float = 10.0, top_k: int = 5
    ):
        self.api_key = api_key or serper_key(required=True)
        self.base_url = (base_url or os.environ.get("SERPER_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.timeout = timeout
        self.top_k = top_k

    def run(self, text: str) -> str:
        import httpx

        query = strip_quotes(text)
        if not query:
            raise ToolError("empty search query")
        url = f"{self.base_url}/search"
        try:
            response = httpx.post(
                url,
                json={"q": query},
                headers={"X-API-KEY": self.api_key, "Content-Type": "application/json"},
                timeout=self.timeout,
            )
        except httpx.TimeoutException:
            raise ToolError(f"web search timed out after {self.timeout:g}s ({url})") from None
        except httpx.HTTPError as exc:
            raise ToolError(f"web search failed: cannot reach {url} ({type(exc).__name__}: {exc})") from None
        if response.status_code in (401, 403):
            raise ToolError(f"web search refused the API key (HTTP {response.status_code}); check SERPER_API_KEY")
        if response.status_code != 200:
            raise ToolError(f"web search failed: HTTP {response.status_code} from {url}")
        try:
            data = response.json()
        except ValueError:
            raise ToolError("web search returned something that is not JSON") from None
        return self.format(data)

    def format(self, data: dict) -> str:
        lines: list[str] = []
        box = data.get("answerBox") or {}
        for key in ("answer", "snippet"):
            if box.get(key):
                lines.append(str(box[key]))
                break
        graph = data.get("knowledgeGraph") or {}
        if graph.get("description"):
            title = graph.get("title", "")
            lines.append(f"{title}: {graph['description']}" if title else str(graph["description"]))
        for item in (data.get("organic") or [])[: self.top_k]:
            snippet = item.get("snippet") or ""
            title = item.get("title") or ""
            if snippet or title:
                lines.append(f"{title}: {snippet}".strip(": "))
        if not lines:
            return "no results"
        return "\n".join(f"[{i + 1}] {line}" for i, line in enumerate(lines))
