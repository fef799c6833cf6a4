"""instruct.scrub: instruction pairs (logged traffic) through the corpus's cleaning and PII steps, exact dedup."""
from __future__ import annotations

from lifecycle.data.clean import Normalize
from lifecycle.data.document import Drop, Skips
from lifecycle.data.instruct import scrub
from lifecycle.data.pii import ScrubPII


def pair(i: str, prompt: str, response: str) -> dict:
    return {"id": i, "source": "traffic", "messages": [{"role": "user", "content": prompt},
                                                       {"role": "assistant", "content": response}]}


class DropWord:
    name, kinds = "blocklist", None

    def __call__(self, doc):
        return Drop("blocked") if "forbidden" in doc.text else doc


class CodeOnly:
    name, kinds = "code", ["code"]

    def __call__(self, doc):
        return Drop("never_for_chat")


def test_pairs_are_cleaned_scrubbed_and_deduplicated():
    steps = [Normalize(kinds=None, unicode_form="NFC", strip_control_chars=True, fix_whitespace=True,
                       html_leftovers=True, boilerplate={}),
             ScrubPII(kinds=None, email=True, ip=True, phone=True, credentials=True,
                      placeholders={"email": "<EMAIL>", "ip": "<IP>", "phone": "<PHONE>", "credentials": "<SECRET>"}),
             DropWord(), CodeOnly()]
    skips = Skips()
    records = [pair("a", "Mail me at jane.doe@corp.com please", "Sure.\x07  "),
               pair("b", "Mail me at jane.doe@corp.com please", "Sure.\x07  "),    # the same pair again
               pair("c", "say the forbidden word", "no"),
               pair("d", "hello", "\x07\x07")]                                   # nothing left after cleaning
    kept = scrub(records, steps, skips)
    assert [r["id"] for r in kept] == ["a"]
    assert kept[0]["messages"][0]["content"] == "Mail me at <EMAIL> please"
    assert kept[0]["messages"][1]["content"] == "Sure."
    assert dict(skips.counts) == {"duplicate_pair": 1, "blocklist/blocked": 1, "clean/empty_after_cleaning": 1}
