"""Twilio Smart Encoding: look-alike Unicode characters replaced by GSM-7 ones before pricing.

One table, from Twilio's published list (https://www.twilio.com/docs/messaging/services/
smart-encoding-char-list) as its segment calculator carries it (TwilioDevEd/
message-segment-calculator, ``src/libs/SmartEncodingMap.ts``, which also lists the dashes,
ellipsis, bullet and invisible characters below). Two deliberate differences from the
calculator's map, both visible to the recipient and priced as sent: every space-like character
(no-break, em, thin... spaces, tab) becomes one space, not two (or seven for a tab), and the
single angle quotation marks keep their direction (U+2039 -> <, U+203A -> >). Replacement is
per code point, so ``smart_encode(a + b) == smart_encode(a) + smart_encode(b)``.
"""

from __future__ import annotations

# Replacement -> the characters it replaces.
_REPLACED_BY: dict[str, str] = {
    '"': "\u00ab\u00bb\u201c\u201d\u02ba\u02ee\u201f\u201e\u275d\u275e\u301d\u301e\uff02",
    "'": ("\u2018\u2019\u02bb\u02c8\u02bc\u02bd\u02b9\u201b\uff07\u00b4\u02ca\u0060\u02cb"
          "\u275b\u275c\u0313\u0314\ufe10\ufe11"),
    "/": "\u00f7\u29f8\u0337\u0338\u2044\u2215\uff0f",
    "1/4": "\u00bc",
    "1/2": "\u00bd",
    "3/4": "\u00be",
    "\\": "\u29f9\u29f5\u20e5\ufe68\uff3c",
    "_": "\u0332\uff3f\u2017",
    "|": "\u20d2\u20d3\u2223\uff5c\u23b8\u23b9\u23d0\u239c\u239f",
    "-": "\u23bc\u23bd\u2015\ufe63\uff0d\u2010\u2043\u2014\u2013\u2022",
    "@": "\ufe6b\uff20",
    "$": "\ufe69\uff04",
    "!": "\u01c3\ufe15\ufe57\uff01",
    "!!": "\u203c",
    "#": "\ufe5f\uff03",
    "%": "\ufe6a\uff05",
    "&": "\ufe60\uff06",
    ",": "\u201a\u0326\ufe50\ufe51\uff0c\uff64\u3001",
    "(": "\u2768\u276a\ufe59\uff08\u27ee\u2985",
    ")": "\u2769\u276b\ufe5a\uff09\u27ef\u2986",
    "*": ("\u204e\u2217\u229b\u2722\u2723\u2724\u2725\u2731\u2732\u2733\u273a\u273b\u273c"
          "\u273d\u2743\u2749\u274a\u274b\u29c6\ufe61\uff0a"),
    "+": "\u02d6\ufe62\uff0b",
    ".": "\u3002\ufe52\uff0e\uff61",
    "...": "\u2026",
    ":": "\u02d0\u02f8\u2982\ua789\ufe13\uff1a",
    ";": "\u204f\ufe14\ufe54\uff1b",
    "<": "\ufe64\uff1c\u2039",
    "=": "\u0347\ua78a\ufe66\uff1d",
    ">": "\ufe65\uff1e\u203a",
    "?": "\ufe16\ufe56\uff1f",
    "^": "\u02c6\u0302\uff3e\u1dcd",
    "{": "\u2774\ufe5b\uff5b",
    "}": "\u2775\ufe5c\uff5d",
    "[": "\uff3b",
    "]": "\uff3d",
    "~": "\u02dc\u02f7\u0303\u0330\u0334\u223c\uff5e",
    " ": ("\u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f"
          "\u205f\u3000\u008d\u009f\u0080\u0090\u009b\u0009\u2028\u2029"),
    "": ("\u0010\u0000\u0003\u0004\u0017\u0019\u0011\u0012\u0013\u0014\u2060\u200b"
         "\ufeff"),
}
# Fullwidth digits and Latin capitals, and small capital letters.
_REPLACED_BY.update({chr(ord("0") + i): chr(0xFF10 + i) for i in range(10)})
_SMALL_CAPITALS = ("\u1d00\u0299\u1d04\u1d05\u1d07\ua730\u0262\u029c\u026a\u1d0a\u1d0b\u029f"
                   "\u1d0d\u0274\u1d0f\u1d18\u0000\u0280\ua731\u1d1b\u1d1c\u1d20\u1d21\u0000"
                   "\u028f\u1d22")  # A..Z; none for Q and X
_REPLACED_BY.update({chr(ord("A") + i): chr(0xFF21 + i) + small.strip("\u0000")
                     for i, small in enumerate(_SMALL_CAPITALS)})

TABLE: dict[str, str] = {source: target for target, sources in _REPLACED_BY.items()
                         for source in sources}
SMART_TRANSLATION: dict[int, str | None] = {ord(source): target or None
                                            for source, target in TABLE.items()}
_ASCII_SOURCES = "".join(c for c in TABLE if c.isascii())


def smart_encode(text: str) -> str:
    """The text as Smart Encoding sends it: each listed character replaced, the rest as is."""
    if text.isascii() and not any(c in text for c in _ASCII_SOURCES):
        return text
    return text.translate(SMART_TRANSLATION)
