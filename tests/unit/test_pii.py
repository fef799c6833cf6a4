"""PII scrubbing: each type found, replaced and counted; look-alikes in code and prose left alone."""
from __future__ import annotations

import ast
import pickle
import sysconfig
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lifecycle import CONF_DIR
from lifecycle.data.document import Document
from lifecycle.data.pii import ScrubPII
from lifecycle.errors import ConfigError

PLACEHOLDERS = {"email": "<EMAIL>", "ip": "<IP>", "phone": "<PHONE>", "credentials": "<SECRET>"}
SCRUB = instantiate(OmegaConf.load(Path(CONF_DIR) / "step" / "pii.yaml"))


def scrub(text: str) -> tuple[str, dict[str, int]]:
    return SCRUB.scrub(text)


@pytest.mark.parametrize("text, expected, kind", [
    ("mail jane.doe+news@mail.acme.co.uk today", "mail <EMAIL> today", "email"),
    ("Author: Barry <barry@python.org>", "Author: Barry <<EMAIL>>", "email"),
    ("server at 93.184.216.34.", "server at <IP>.", "ip"),
    ("ping 8.8.8.8 or 1.1.1.1", "ping <IP> or <IP>", "ip"),
    ("dns 2606:4700:4700::1111 up", "dns <IP> up", "ip"),
    ("host [2a00:1450:4001:0829:0000:0000:0000:200e]:443", "host [<IP>]:443", "ip"),
    ("call +44 20 7946 0958 now", "call <PHONE> now", "phone"),
    ("call +1 (415) 555-2671", "call <PHONE>", "phone"),
    ("office (415) 555-2671.", "office <PHONE>.", "phone"),
    ("cell 415-555-2671 or 415.555.2671", "cell <PHONE> or <PHONE>", "phone"),
    ("toll free 1-800-555-0199", "toll free <PHONE>", "phone"),
    ('"phone": "+14155552671"', '"phone": "<PHONE>"', "phone"),
    ("key AKIAIOSFODNN7EXAMPLE here", "key <SECRET> here", "credentials"),
    ("GH=ghp_" + "a1B2" * 9, "GH=<SECRET>", "credentials"),
    ("github_pat_11ABCDEFG0123456789_abcdefghijkl", "<SECRET>", "credentials"),
    ("OPENAI sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8t", "OPENAI <SECRET>", "credentials"),
    ("slack xoxb-1234567890-abcdefABCDEF", "slack <SECRET>", "credentials"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow+abc/1=\n-----END RSA PRIVATE KEY-----\nrest", "<SECRET>\nrest",
     "credentials"),
    ('password = "hunter2"', 'password = "<SECRET>"', "credentials"),
    ("DB_PASSWORD: 'S3cr3t!x'", "DB_PASSWORD: '<SECRET>'", "credentials"),
    ('{"api_key": "abcd1234efgh"}', '{"api_key": "<SECRET>"}', "credentials"),
    ("login(user, passwd='geheim$parole')", "login(user, passwd='<SECRET>')", "credentials"),
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "AWS_SECRET_ACCESS_KEY=<SECRET>", "credentials"),
    ("auth_token: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
     "auth_token: <SECRET>", "credentials"),
])
def test_each_type_is_replaced_and_counted(text, expected, kind):
    out, counts = scrub(text)
    assert out == expected
    assert counts == {kind: expected.count(PLACEHOLDERS[kind])}


@pytest.mark.parametrize("text", [
    "Python 3.11.7 and 1.2.3.4.5 and v1.2.3.4 and 1.0.0.127.in-addr.arpa",
    "loopback 127.0.0.1, private 10.0.0.1 192.168.1.1 172.16.0.5, docs 192.0.2.1 2001:db8::1, ::1 fe80::1 ::",
    "bad octets 256.1.1.1 and 01.02.03.04",
    "dates 2024-01-15, 15/01/2024, 2024-01-15T12:30:45+05:30, at 12:30:45, epoch 1700000000",
    "numbers 1234567890123, x = +4294967296, format(1234, '+b') == '+10011010010', 6 12 24 48 96 192 384 768 1536",
    "colours #ffffff #fff rgb(255, 255, 255), hex 0xdeadbeef deadbeef",
    "std::vector<int> v; Face::add(); a[1::2] x[::2] dead::beef",
    "mac 00:1a:2b:3c:4d:5e uuid 123e4567-e89b-12d3-a456-426614174000",
    "sha da39a3ee5e6b4b0d3255bfef95601890afd80709 and sk-learn-is-a-python-library",
    "token_type = 'word'\nTOKEN = 'NAME'\nif token == 'x': pass\ndef get_password(self): pass\n",
    "secret = None\npassword = ''\npassword = \"<PASSWORD>\"\npassword = os.environ['PASSWORD']\nkey = 'abcdefgh'\n",
    "api_key = ${API_KEY}\ntoken = %(token)s\nsecret_key: changeme\n",
    "user@example.com, admin@mail.example.org, root@host.test, @property.setter, a@b, x @ y.T",
])
def test_look_alikes_are_left_alone(text):
    assert scrub(text) == (text, {})


def test_document_metadata_counts_merge_and_input_is_not_mutated():
    doc = Document(id="d", text="Mail bob@acme.io or eve@acme.io from 8.8.8.8", source="s", kind="web",
                   metadata={"pii": {"email": 1}, "lang": "en"})
    out = SCRUB(doc)
    assert out.text == "Mail <EMAIL> or <EMAIL> from <IP>"
    assert out.metadata == {"pii": {"email": 3, "ip": 1}, "lang": "en"}
    assert doc.metadata == {"pii": {"email": 1}, "lang": "en"} and "bob" in doc.text
    assert SCRUB(out) is out  # placeholders are not found again


def test_clean_documents_come_back_as_is_and_never_drop():
    doc = Document(id="d", text="nothing personal here", source="s", kind="prose")
    assert SCRUB(doc) is doc


def test_types_and_kinds_can_be_switched_off():
    text = "bob@acme.io 8.8.8.8"
    only_ip = ScrubPII(kinds=None, email=False, ip=True, phone=False, credentials=False, placeholders=PLACEHOLDERS)
    assert only_ip.scrub(text) == ("bob@acme.io <IP>", {"ip": 1})
    web_only = ScrubPII(kinds=["web"], email=True, ip=True, phone=True, credentials=True, placeholders=PLACEHOLDERS)
    code = Document(id="d", text=text, source="s", kind="code")
    assert web_only(code) is code
    custom = ScrubPII(kinds=None, email=True, ip=False, phone=False, credentials=False, placeholders={"email": "[@]"})
    assert custom.scrub(text)[0] == "[@] 8.8.8.8"
    with pytest.raises(ConfigError, match="placeholders lacks"):
        ScrubPII(kinds=None, email=True, ip=True, phone=False, credentials=False, placeholders={"email": "x"})


def test_survives_pickle():
    copy = pickle.loads(pickle.dumps(SCRUB))
    text = "bob@acme.io password='hunter22' +44 20 7946 0958"
    assert copy.scrub(text) == scrub(text)


STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.mark.parametrize("name, most", [("ipaddress.py", 0), ("json/decoder.py", 0), ("email/utils.py", 3),
                                        ("smtplib.py", 15), ("socket.py", 2)])
def test_real_python_source_barely_changes_and_still_parses(name, most):
    text = (STDLIB / name).read_text(encoding="utf-8")
    out, counts = scrub(text)
    # ipaddress.py is full of loopback, private and documentation addresses; smtplib has real author emails.
    assert sum(counts.values()) <= most, counts
    assert counts.get("credentials", 0) == counts.get("phone", 0) == 0
    ast.parse(out)
