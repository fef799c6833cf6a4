"""Data steps: cleaning, Gopher and code quality rules, the block list, and their configs in conf/step/."""
from __future__ import annotations

import inspect
import pickle
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from lifecycle import CONF_DIR
from lifecycle.data.clean import Normalize
from lifecycle.data.document import Document, Drop
from lifecycle.data.filters import BlockList, _duplicate_ngram_chars, _top_ngram_chars
from lifecycle.errors import ConfigError

STEPS = Path(CONF_DIR) / "step"

BASE = """The old harbour town wakes slowly in winter. Fishing boats rest against the stone quay while gulls
circle above the market square, waiting for the first crates of herring to appear.

Most of the residents have lived here for generations, and they speak about the sea with a mixture of
respect and quiet humour. Children learn to read the weather long before they learn to ride a bicycle.

In the afternoon a pale sun breaks through the clouds. Shopkeepers sweep their doorsteps, a baker sells
warm rye bread, and an elderly painter sets up an easel near the lighthouse to capture that fleeting light.
"""


def step(name: str, **overrides):
    """A step from its YAML in conf/step/, with some keys replaced (not merged)."""
    cfg = OmegaConf.load(STEPS / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return instantiate(cfg)


def doc(text: str, kind: str = "prose") -> Document:
    return Document(id="t:1", text=text, source="test", kind=kind)


def verdict(s, text: str, kind: str = "prose"):
    out = s(doc(text, kind))
    return out.reason if isinstance(out, Drop) else "kept"


# --- cleaning ---------------------------------------------------------------------------------------------------

def test_control_and_zero_width_chars_go_but_tabs_newlines_and_zwj_stay():
    text = "\ufeffa\x00b\x1b[0mc\x85d\u200be\u2060f\tg\nh \u200d i\n"
    assert step("clean").clean(text, "prose") == "ab[0mcdef g\nh \u200d i\n"
    assert step("clean").clean(text, "code") == "ab[0mcdef\tg\nh \u200d i\n"


def test_newlines_trailing_spaces_and_blank_lines():
    text = "one  \r\ntwo\rthree\t\n\n\n\n\n\nfour\n\n"
    assert step("clean").clean(text, "prose") == "one\ntwo\nthree\n\n\nfour\n"


def test_code_keeps_indentation_tabs_and_inner_spaces():
    code = "def f(x):\n\tif x:    # why\n\t\treturn {'a':  1}   \n    pass\n"
    out = step("clean").clean(code, "code")
    assert out == "def f(x):\n\tif x:    # why\n\t\treturn {'a':  1}\n    pass\n"
    assert step("clean").clean("  indented   prose  line\n", "prose") == "  indented prose line\n"


def test_html_leftovers_in_web_text_but_not_in_code():
    web = '<div class="post">Fish &amp; chips<br>are &quot;good&quot;&#27;</p><script>var x = 1;</script>\n' \
          "Escaped &lt;div&gt; and List<String> stay text.\n"
    assert step("clean").clean(web, "web") == 'Fish & chips\nare "good"\n\nEscaped <div> and List<String> stay text.\n'
    code = "html = '<br>' + '&amp;'\n"
    assert step("clean").clean(code, "code") == code


def test_unicode_forms():
    assert step("clean").clean("cafe\u0301 \ufb01ne\n", "prose") == "caf\u00e9 \ufb01ne\n"   # NFC composes only
    assert step("clean", unicode_form="NFKC").clean("\ufb01ne \uff21\n", "prose") == "fine A\n"
    assert step("clean", unicode_form=None).clean("cafe\u0301\n", "prose") == "cafe\u0301\n"
    with pytest.raises(ConfigError, match="unicode_form='NFD'"):
        Normalize(kinds=None, unicode_form="NFD", strip_control_chars=True, fix_whitespace=True,
                  html_leftovers=True, boilerplate={})


def test_boilerplate_lines_removed_per_kind():
    header = ("# Copyright (c) 2021 Acme Corp.\n# SPDX-License-Identifier: Apache-2.0\n"
              "# Licensed under the Apache License, Version 2.0 (the \"License\");\n"
              "# you may not use this file except in compliance with the License.\n")
    code = header + "import os\nyear = 2021  # Copyright only mid-line stays\n"
    assert step("clean").clean(code, "code") == "import os\nyear = 2021  # Copyright only mid-line stays\n"
    # The same lines in prose are content, not boilerplate.
    assert step("clean").clean(header, "prose") == header

    page = ("Home | About | Contact\nSkip to content\nThe article starts here.\n"
            "We use cookies to make this site work.\n\u00a9 2024 Acme Inc. All rights reserved.\n"
            "Privacy Policy | Terms of Use\nBack to top\n")
    assert step("clean").clean(page, "web") == "The article starts here.\n"
    assert "Home | About | Contact" in step("clean").clean(page, "code")


def test_empty_after_cleaning_is_dropped():
    assert verdict(step("clean"), "\u200b \n\t\n\x00") == "empty_after_cleaning"
    assert verdict(step("clean"), "# Copyright 2020 Acme\n", "code") == "empty_after_cleaning"


def test_clean_document_comes_back_as_is_and_other_kinds_pass_through():
    d = doc("Already clean.\n")
    assert step("clean")(d) is d
    dirty = doc("a\x00b", kind="code")
    assert step("clean", kinds=["web"])(dirty) is dirty
    out = step("clean")(dirty)
    assert out.text == "ab" and dirty.text == "a\x00b" and out.id == dirty.id


# --- Gopher quality ---------------------------------------------------------------------------------------------

def test_gopher_keeps_ordinary_prose():
    assert verdict(step("gopher"), BASE) == "kept"


def _sentences() -> list[str]:
    return [s.strip() for s in BASE.replace("\n", " ").split(".") if s.strip()]


@pytest.mark.parametrize("text, overrides, reason", [
    ("The cat sat with the dog and that was all.", {}, "too_few_words"),
    (BASE, {"max_words": 100}, "too_many_words"),
    ("it is to be or an ox at my go up we do so " * 6, {}, "short_mean_word_length"),
    ("internationalization characterization telecommunications " * 20, {}, "long_mean_word_length"),
    (BASE + "#" * 30 + "\n", {}, "symbol_word_ratio"),
    (BASE + "and so on... " * 15, {}, "symbol_word_ratio"),
    ("\n".join(f"\u2022 {s}." for s in _sentences()), {}, "bullet_lines"),
    ("\n".join(f"{s}..." if i % 2 else f"{s}." for i, s in enumerate(_sentences())), {}, "ellipsis_lines"),
    (BASE + " ".join(str(1000 + i) for i in range(120)), {}, "few_alpha_words"),
    (" ".join(w for w in BASE.split() if w.lower().strip(".,") not in {"the", "be", "to", "of", "and", "that",
                                                                        "have", "with"}), {}, "few_stop_words"),
])
def test_gopher_quality_rules(text, overrides, reason):
    assert verdict(step("gopher", **overrides), text) == reason


def test_gopher_repetition_rules():
    p1, p2, p3 = BASE.strip().split("\n\n")
    assert verdict(step("gopher"), "\n\n".join([p1, p2, p1, p1])) == "dup_paragraph_fraction"
    shorts = [f"Note {i}: the tide was {i} feet." for i in range(6)]
    assert verdict(step("gopher"), "\n\n".join([BASE.strip(), *shorts, BASE.strip()])) == "dup_paragraph_char_fraction"
    lines = p2.split("\n") + p3.split("\n")
    assert verdict(step("gopher"), "\n".join(lines + [lines[0]] * 3)) == "dup_line_fraction"
    long_line = BASE.replace("\n", " ").strip()
    assert verdict(step("gopher"), "\n".join([long_line, *shorts, long_line])) == "dup_line_char_fraction"
    spam = " ".join(f"red apple sale{i} the and" for i in range(40))
    assert verdict(step("gopher"), spam) == "top_2gram"


REPEATED = BASE + "\n" + " ".join(["ocean breeze carries salt spray over dark rocks near quiet coves"] * 12)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_top_ngram_rule_each_size(n):
    only = {"max_top_ngram_char_fraction": {n: 0.05}, "max_duplicate_ngram_char_fraction": {}}
    assert verdict(step("gopher", **only), REPEATED) == f"top_{n}gram"
    assert verdict(step("gopher", **{**only, "max_top_ngram_char_fraction": {n: 0.99}}), REPEATED) == "kept"


@pytest.mark.parametrize("n", [5, 6, 7, 8, 9, 10])
def test_duplicate_ngram_rule_each_size(n):
    only = {"max_top_ngram_char_fraction": {}, "max_duplicate_ngram_char_fraction": {n: 0.10}}
    assert verdict(step("gopher", **only), REPEATED) == f"dup_{n}gram"
    assert verdict(step("gopher", **{**only, "max_duplicate_ngram_char_fraction": {n: 0.99}}), REPEATED) == "kept"


def test_ngram_character_counts():
    assert _top_ngram_chars("the cat the cat the dog".split(), 2) == 2 * len("thecat")
    # "ab c ab" occurs at words 0 and 2: every occurrence counts, overlaps once, so words 0..4 are covered.
    assert _duplicate_ngram_chars("ab c ab c ab x".split(), 3) == len("abcabcab")
    assert _duplicate_ngram_chars("a b c d".split(), 2) == 0


def test_gopher_leaves_code_alone_and_null_disables_a_rule():
    assert verdict(step("gopher"), "x = 1\n", kind="code") == "kept"
    assert verdict(step("gopher", min_words=None), "Short but fine with the sea and that boat.") == "kept"


# --- code quality -----------------------------------------------------------------------------------------------

PY = "import os\n\n\ndef main(argv):\n    \"\"\"Parser for tables generated by pgen.\"\"\"\n    return len(argv)\n"


@pytest.mark.parametrize("text, reason", [
    (PY, "kept"),
    (PY + "x = '" + "a" * 1000 + "'\n", "long_line"),
    ("\n".join(f"value_{i} = '{'b' * 140}'" for i in range(20)), "long_mean_line"),
    ("x = [\n" + "    {}, (), [], {}, (), [],\n" * 50 + "]\n", "low_alnum_fraction"),
    ("# Generated by the protocol buffer compiler.  DO NOT EDIT!\n" + PY, "autogenerated"),
    ("// Code generated by stringer; do not edit.\n" + PY, "autogenerated"),
    ('"""Auto-generated file."""\n' + PY, "autogenerated"),
    (PY * 2 + "# Generated by hand, once upon a time.\n", "kept"),  # past the first five lines
])
def test_code_rules(text, reason):
    assert verdict(step("code"), text, kind="code") == reason


def test_code_rules_apply_to_code_only():
    assert verdict(step("code"), "x" * 2000, kind="prose") == "kept"


# --- block list -------------------------------------------------------------------------------------------------

def test_block_list_whole_words_any_case(tmp_path):
    terms = tmp_path / "terms.txt"
    terms.write_text("# reviewed list\nfrobnicate\nvery bad  # a phrase\n\n")
    s = step("blocklist", words=["c++", "Gizmo"], path=str(terms))
    assert verdict(s, "We sell a GIZMO here.") == "blocked_term"
    assert verdict(s, "This is Very Bad news.") == "blocked_term"
    assert verdict(s, "Don't frobnicate that.") == "blocked_term"
    assert verdict(s, "Written in C++ today.") == "blocked_term"
    assert verdict(s, "Gizmos and frobnicated, not a whole word.") == "kept"
    assert verdict(s, "A very badly named thing.") == "kept"
    assert verdict(pickle.loads(pickle.dumps(s)), "gizmo") == "blocked_term"


def test_block_list_hits_allowed_and_empty_list_is_a_no_op():
    s = step("blocklist", words=["gizmo"], max_hits=1)
    assert verdict(s, "one gizmo") == "kept"
    assert verdict(s, "gizmo, gizmo") == "blocked_term"
    d = doc("anything at all")
    assert step("blocklist")(d) is d
    assert BlockList(kinds=["web"], words=["gizmo"], path=None, max_hits=0)(doc("gizmo")).text == "gizmo"


# --- configs ----------------------------------------------------------------------------------------------------

SAMPLES = {"code": doc(PY, "code"), "prose": doc(BASE, "prose")}


@pytest.mark.parametrize("path", sorted(STEPS.glob("*.yaml")), ids=lambda p: p.stem)
def test_step_yaml_instantiates_runs_and_pickles(path):
    s = instantiate(OmegaConf.load(path))
    assert s.name == path.stem
    copy = pickle.loads(pickle.dumps(s))
    for sample in SAMPLES.values():
        out = s(sample)
        assert isinstance(out, (Document, Drop))
        assert copy(sample) == out


@pytest.mark.parametrize("path", sorted(STEPS.glob("*.yaml")), ids=lambda p: p.stem)
def test_step_yaml_keys_are_exactly_the_constructor_arguments_without_defaults(path):
    cfg = OmegaConf.load(path)
    params = inspect.signature(get_class(cfg._target_)).parameters
    assert set(params) == set(cfg) - {"_target_"}
    assert all(p.default is inspect.Parameter.empty for p in params.values()), "defaults live in the YAML"
    assert path.read_text().startswith(f"# @package steps.{path.stem}\n")


def test_steps_compose_as_a_list_under_steps():
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose(overrides=["+step=[clean,gopher,code,blocklist,pii]"])
    assert list(cfg.steps) == ["clean", "gopher", "code", "blocklist", "pii"]
    assert isinstance(instantiate(cfg.steps.clean), Normalize)
