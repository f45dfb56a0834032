"""Helpers of the dashboard tests: logging in through the form, reading pages."""

from __future__ import annotations

import re
from typing import Any

import httpx

TOKEN_RE = re.compile(r'name="(login_token|csrf_token)" value="([^"]+)"')


def hidden_field(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no hidden field {name} in the page"
    return match.group(1)


def login(client: "httpx.Client | Any", username: str, password: str, next_url: str = "") -> httpx.Response:
    """Log in through the dashboard's form (GET for the nonce cookie, then POST). Returns the POST answer."""
    page = client.get("/dashboard/login")
    assert page.status_code == 200, page.text
    return client.post("/dashboard/login", data={
        "username": username, "password": password, "login_token": hidden_field(page.text, "login_token"),
        "next": next_url,
    }, follow_redirects=False)


def logged_in_client(url: str, username: str, password: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=60)
    answer = login(client, username, password)
    assert answer.status_code == 303, answer.text
    return client


def text_of(html: str) -> str:
    """The page's visible text, whitespace collapsed (for simple assertions)."""
    html = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip()
