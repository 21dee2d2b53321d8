"""The CLI's admin commands: admin keys made only here, and the admin API's operations."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from service.cli import main
from tests.conftest import Stack, make_tenant
from tests.rest import assert_error, call

ADMIN_KEY_RE = re.compile(r"sk-admin-[A-Za-z0-9_-]{43}")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def arun(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """As run(), off the loop: the CLI runs its own (a test's servers run on this one)."""
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_admin_keys_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = ("--data-dir", str(tmp_path))
    code, out, _ = run(capsys, "admin-keys", "list", *d)
    assert code == 0 and out.splitlines()[1:] == []  # none by default
    code, out, _ = run(capsys, "admin-keys", "create", "ops", *d)
    assert code == 0
    key = ADMIN_KEY_RE.search(out)
    key_id = re.search(r"adm_[0-9a-f]{16}", out)
    assert key and key_id
    code, listed, _ = run(capsys, "admin-keys", "list", *d)
    assert key_id.group() in listed and "active" in listed and "ops" in listed
    assert key.group() not in listed and key.group()[:13] in listed
    # Only the hash is kept.
    assert key.group().encode() not in (tmp_path / "imagegate.db").read_bytes()
    assert run(capsys, "admin-keys", "revoke", key_id.group(), *d)[0] == 0
    assert "revoked" in run(capsys, "admin-keys", "list", *d)[1]
    code, _, err = run(capsys, "admin-keys", "revoke", key_id.group(), *d)
    assert code == 1 and err.startswith("imagegate: ") and err.count("\n") == 1


def test_accounts_keys_usage_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = ("--data-dir", str(tmp_path))
    assert run(capsys, "accounts", "create", "acme", "--credit", "3", *d)[0] == 0
    assert run(capsys, "accounts", "create", "zeta", *d)[0] == 0
    code, out, _ = run(capsys, "accounts", "list", "--json", *d)
    assert [(a["name"], a["balance_micros"], a["held_micros"]) for a in json.loads(out)] == [
        ("acme", 3_000_000, 0),
        ("zeta", 0, 0),
    ]
    shown = json.loads(run(capsys, "accounts", "show", "acme", "--json", *d)[1])
    assert [(e["kind"], e["amount_micros"]) for e in shown["ledger"]] == [("credit", 3_000_000)]
    code, out, _ = run(capsys, "keys", "create", "acme", "--models", "local", *d)
    key_id = out.split()[1]
    code, out, _ = run(capsys, "keys", "models", key_id, "local,other", *d)
    assert code == 0 and out.strip() == f"{key_id}: models local,other"
    code, out, _ = run(capsys, "keys", "models", key_id, "", *d)
    assert out.strip() == f"{key_id}: models *"
    listed = run(capsys, "keys", "list", "acme", *d)[1]
    assert re.search(rf"{key_id} .* \* ", listed)  # every model now
    code, out, _ = run(capsys, "usage", "acme", "--by-day", "--json", *d)
    assert code == 0 and json.loads(out) == []
    code, _, err = run(capsys, "usage", "acme", "--by-day", "--days", "0", *d)
    assert code == 1 and "days" in err and err.count("\n") == 1
    code, _, err = run(capsys, "keys", "models", "key_nope", "local", *d)
    assert code == 1 and "no key key_nope" in err
    code, _, err = run(capsys, "accounts", "create", "bad/name", *d)
    assert code == 1 and "account name" in err


async def test_a_cli_admin_key_drives_the_api_on_both_fronts(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    d = ("--data-dir", str(stack.service.config.data_dir))
    tenant = await make_tenant(stack.service)
    code, out, _ = await arun(capsys, "admin-keys", "create", "console", *d)
    assert code == 0
    key = ADMIN_KEY_RE.search(out)
    key_id = re.search(r"adm_[0-9a-f]{16}", out)
    assert key and key_id
    for front in stack.fronts.values():
        reply = await call("GET", f"{front}/admin/v1/accounts/{tenant.account}", key=key.group())
        assert reply.status == 200 and reply.json()["account"]["name"] == tenant.account
        credited = await call(
            "POST",
            f"{front}/admin/v1/accounts/{tenant.account}/credit",
            key=key.group(),
            json_body={"amount_usd": "1"},
        )
        assert credited.status == 200
    code, out, _ = await arun(capsys, "accounts", "show", tenant.account, "--json", *d)
    shown = json.loads(out)
    assert shown["balance_micros"] == (1 + len(stack.fronts)) * 1_000_000
    assert shown["ledger_sum_micros"] == shown["balance_micros"]
    assert (await arun(capsys, "admin-keys", "revoke", key_id.group(), *d))[0] == 0
    for front in stack.fronts.values():
        reply = await call("GET", f"{front}/admin/v1/accounts", key=key.group())
        assert_error(reply, 401, "invalid_request_error", "invalid_api_key")
