#!/usr/bin/env python3
"""Example external reward module for nested-reft, in Python (standard library only).

It speaks the JSON Lines protocol of the `rewards` crate on stdin/stdout:

    -> {"id": 7, "samples": [{"prompt": "...", "completion": "...", "reference": "...", "metadata": {}}]}
    <- {"id": 7, "results": [{"score": 1.0, "extracted": "42", "matched_by": "hashes"}, {"error": "why"}]}

and scores like the built-in `math` reward: extract the final answer (\\boxed{}, `#### N`,
"the answer is", last number), normalise it, compare exactly as fractions. It is a compact
port of the common cases; copy it and replace `score()` to write your own reward.

Config in the server (paths relative to the config file):

    [reward]
    kind = "external"
    command = ["python3", "math_reward.py"]
    timeout_ms = 5000
"""

import json
import re
import sys
from fractions import Fraction

SCAN_TAIL = 8192
MAX_ANSWER = 512

ANSWER_PHRASE = re.compile(r"(?i)\banswer\s*(?:is\s*:?|:|=)")
NUMBER = re.compile(
    r"[-−]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:/\d+)?(?:[eE][-+]?\d+)?(?:\s*%)?"
)
SCALAR = re.compile(
    r"([-+])?\s*((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:\s*/\s*(\d+(?:\.\d+)?))?"
    r"(?:[eE]([-+]?\d+)|\s*(?:\\times|\\cdot|×|\*|x)\s*10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?)?(\s*%)?"
)
FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def tail(s, n=SCAN_TAIL):
    b = s.encode("utf-8")
    return b[-n:].decode("utf-8", "ignore") if len(b) > n else s


def matching_brace(s, start):
    depth = 0
    for i in range(start, min(len(s), start + MAX_ANSWER + 1)):
        c = s[i]
        if c == "{":
            depth += 1
        elif c == "}":
            if depth == 0:
                return i
            depth -= 1
    return None


def last_boxed(t):
    end = len(t)
    while True:
        pos = max(t.rfind("\\boxed", 0, end), t.rfind("\\fbox", 0, end))
        if pos < 0:
            return None
        kw = 6 if t.startswith("\\boxed", pos) else 5
        rest = pos + kw
        if t.startswith("{", rest):
            close = matching_brace(t, rest + 1)
            if close is not None and t[rest + 1:close].strip():
                return t[rest + 1:close].strip()
        end = pos


def after_hashes(t):
    pos = t.rfind("####")
    if pos < 0:
        return None
    for line in t[pos + 4:].lstrip("#").splitlines():
        if line.strip():
            return line.strip()
    return None


def after_phrase(t):
    matches = list(ANSWER_PHRASE.finditer(t))
    if not matches:
        return None
    rest = t[matches[-1].end():].lstrip(" \t\r\n*")
    line = rest.splitlines()[0] if rest else ""
    m = re.search(r"\.(\s|$)", line)
    a = (line[: m.start()] if m else line).strip().rstrip("*").strip()
    return a or None


def extract(completion):
    t = tail(completion)
    a = last_boxed(t)
    if a is not None:
        return a, "boxed"
    a = after_hashes(t)
    if a is not None:
        return (a, "hashes") if len(a.encode()) <= MAX_ANSWER else (None, None)
    a = after_phrase(t)
    if a is not None and len(a.encode()) <= MAX_ANSWER:
        return a, "answer_phrase"
    nums = list(NUMBER.finditer(t))
    if nums:
        return nums[-1].group(0), "last_number"
    return None, None


def extract_reference(reference):
    t = tail(reference)
    return after_hashes(t) or last_boxed(t) or reference.strip()


def clean(s):
    s = s.strip()
    for o, c in (("$$", "$$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(o) and s.endswith(c) and len(s) >= len(o) + len(c):
            s = s[len(o): len(s) - len(c)]
    for old, new in (("\\$", ""), ("$", ""), ("€", ""), ("£", ""), ("\\%", "%"), ("−", "-"),
                     ("{,}", ""), ("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""),
                     ("\\;", ""), ("~", ""), ("^\\circ", ""), ("^{\\circ}", ""), ("°", "")):
        s = s.replace(old, new)
    s = TEXT_CMD.sub(r" \1 ", s)
    s = " ".join(s.split())
    m = re.match(r"^[a-zA-Z][a-zA-Z0-9_]*\s*=\s*", s)
    if m and m.end() < len(s):
        s = s[m.end():]
    return s.lstrip("*:").rstrip(".,;:*!").strip()


def unit_only(rest):
    r = re.sub(r"\^\s*\{?\d\}?", "", rest.strip())
    return r == "" or (re.fullmatch(r"[^\W\d_/\\][^\d]*", r) is not None and "\\" not in r)


def parse_number(s):
    """Returns (Fraction, percent) or None."""
    s = s.strip()
    neg = s.startswith("-")
    body = s[1:].strip() if neg or s.startswith("+") else s
    m = FRAC.match(body)
    if m:
        a, b = parse_number(m.group(1)), parse_number(m.group(2))
        if a is None or b is None or b[0] == 0 or not unit_only(body[m.end():]):
            return None
        v = a[0] / b[0]
        return (-v if neg else v), a[1]
    m = SCALAR.match(body)
    if not m or m.group(1):
        return None
    v = Fraction(m.group(2).replace(",", "").rstrip(".") or "0")
    if m.group(3):
        d = Fraction(m.group(3))
        if d == 0:
            return None
        v /= d
    exp = m.group(4) or m.group(5)
    if exp:
        v *= Fraction(10) ** int(exp)
    percent = m.group(6) is not None
    rest = body[m.end():]
    if not (m.group(3) or exp or percent) and v.denominator == 1:
        r = rest.lstrip()
        mixed = FRAC.match(r) or re.match(r"(\d+)\s*/\s*(\d+)", r) if (r != rest or r.startswith("\\")) else None
        if mixed:
            a, b = Fraction(mixed.group(1).strip()), Fraction(mixed.group(2).strip())
            if b != 0 and unit_only(r[mixed.end():]):
                v += a / b
                rest = ""
    if not unit_only(rest):
        return None
    return (-v if neg else v), percent


def equivalent(a, b):
    ca, cb = clean(a), clean(b)
    na, nb = parse_number(ca), parse_number(cb)
    if na is not None and nb is not None:
        (x, px), (y, py) = na, nb
        return x == y or (px and not py and x / 100 == y) or (py and not px and y / 100 == x)
    if na is not None or nb is not None:
        return False
    key = lambda s: "".join(s.split()).lower().strip("()")
    return key(ca) == key(cb)


def score(sample):
    reference = extract_reference(sample["reference"])
    if not reference:
        raise ValueError("the reference answer is empty")
    answer, by = extract(sample["completion"])
    if answer is None:
        return {"score": 0.0}
    return {"score": 1.0 if equivalent(answer, reference) else 0.0, "extracted": answer, "matched_by": by}


def main():
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        results = []
        for sample in request["samples"]:
            try:
                results.append(score(sample))
            except Exception as e:  # one bad sample must not take the batch down
                results.append({"error": f"{type(e).__name__}: {e}"})
        sys.stdout.write(json.dumps({"id": request["id"], "results": results}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
